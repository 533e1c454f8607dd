"""Checkpoints: exact round trips, the latest pointer, pruning, corruption detection and fallback, model files."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from e2ediff.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_model_file,
                                load_optimizer_state, load_rng_state, load_state_strict, optimizer_state,
                                read_model_meta, rng_state, save_checkpoint, save_model_file, split_prefix,
                                with_prefix)


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model/w": torch.randn(3, 5, generator=g), "model/b": torch.randn(5, generator=g).to(torch.bfloat16),
            "model/count": torch.arange(7), "model/mask": torch.rand(4, generator=g) > 0.5,
            "ema/w": torch.randn(3, 5, generator=g).double(), "scalar": torch.tensor(2.5)}


def save_steps(run_dir, steps, keep_last=10):
    for s in steps:
        save_checkpoint(run_dir, s, sample_tensors(s), {"kind": "test", "note": f"step {s}"}, keep_last=keep_last)


def no_temp_files(run_dir) -> bool:
    return not [p for p in run_dir.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]


def test_round_trip_is_exact(tmp_path):
    tensors = sample_tensors()
    path = save_checkpoint(tmp_path, 12, tensors, {"kind": "test", "nested": {"a": [1, 2.5, None]}})
    assert path == tmp_path / "checkpoints" / "step_00000012"
    loaded, state = load_checkpoint(path)
    assert sorted(loaded) == sorted(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    assert state["step"] == 12 and state["kind"] == "test" and state["nested"] == {"a": [1, 2.5, None]}
    assert no_temp_files(tmp_path)


def test_latest_pointer_and_keep_last_pruning(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4, 5], keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["step_00000004", "step_00000005"]
    assert (root / "latest").read_text().strip() == "step_00000005"
    path, tensors, state = latest_checkpoint(tmp_path)
    assert path.name == "step_00000005" and state["step"] == 5 and torch.equal(tensors["model/w"], sample_tensors(5)["model/w"])
    assert no_temp_files(tmp_path)
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_resaving_a_step_replaces_it(tmp_path):
    save_steps(tmp_path, [3])
    save_checkpoint(tmp_path, 3, sample_tensors(9), {"kind": "again"})
    tensors, state = load_checkpoint(tmp_path / "checkpoints" / "step_00000003")
    assert state["kind"] == "again" and torch.equal(tensors["model/w"], sample_tensors(9)["model/w"])


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) - 5] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_byte], ids=["truncated", "flipped-byte"])
def test_corruption_is_detected_and_resume_falls_back(tmp_path, damage):
    save_steps(tmp_path, [1, 2, 3])
    bad = tmp_path / "checkpoints" / "step_00000003" / "tensors.safetensors"
    damage(bad)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad.parent)
    assert str(bad) in str(info.value)
    with pytest.warns(UserWarning, match="step_00000003") as record:
        path, tensors, state = latest_checkpoint(tmp_path)
    assert "falling back" in str(record[0].message)
    assert path.name == "step_00000002" and state["step"] == 2
    assert torch.equal(tensors["model/w"], sample_tensors(2)["model/w"])


def test_corrupt_state_json_and_missing_files_are_named(tmp_path):
    save_steps(tmp_path, [1, 2])
    state = tmp_path / "checkpoints" / "step_00000002" / "state.json"
    state.write_text("{not json")
    with pytest.raises(CheckpointError, match=str(state)):
        load_checkpoint(state.parent)
    (tmp_path / "checkpoints" / "step_00000001" / "tensors.safetensors").unlink()
    with pytest.raises(CheckpointError, match="step_00000001.*incomplete"):
        load_checkpoint(tmp_path / "checkpoints" / "step_00000001")
    with pytest.warns(UserWarning):
        assert latest_checkpoint(tmp_path) is None      # nothing good left


def test_a_failed_save_leaves_no_temp_folder_and_keeps_latest(tmp_path):
    save_steps(tmp_path, [1])
    shared = torch.zeros(4)
    with pytest.raises(Exception):   # safetensors refuses tensors that share memory
        save_checkpoint(tmp_path, 2, {"a": shared, "b": shared}, {"kind": "test"})
    assert no_temp_files(tmp_path)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert not (tmp_path / "checkpoints" / "step_00000002").exists()


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    frozen_grad = nn.Parameter(torch.ones(3))        # in the optimizer but never gets a gradient: no state
    params = [{"params": list(model.parameters()), "lr": 1e-2},
              {"params": [frozen_grad], "lr": 5e-3, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def step(m, o):
        o.zero_grad()
        (m(x) - y).pow(2).mean().backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    t, meta = optimizer_state(opt, "optim/net")
    save_checkpoint(tmp_path, 3, {**t, **with_prefix(model.state_dict(), "net")}, {"optim": meta})
    tensors, state = load_checkpoint(tmp_path / "checkpoints" / "step_00000003")

    torch.manual_seed(1)                              # a fresh, differently initialised copy
    model2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    frozen2 = nn.Parameter(torch.ones(3))
    opt2 = torch.optim.AdamW([{"params": list(model2.parameters())}, {"params": [frozen2]}], lr=0.5)
    load_state_strict(model2, split_prefix(tensors, "net"), "test")
    load_optimizer_state(opt2, "optim/net", tensors, state["optim"])
    assert [g["lr"] for g in opt2.param_groups] == [1e-2, 5e-3]
    step(model, opt)
    step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for k, v in opt.state_dict()["state"].items():
        for name, value in v.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt2.state_dict()["state"][k][name]))


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    torch.rand(3), random.random(), np.random.rand(2)
    t, meta = rng_state()
    save_checkpoint(tmp_path, 1, t, {"rng": meta})
    expected = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn(1))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    tensors, state = load_checkpoint(tmp_path / "checkpoints" / "step_00000001")
    load_rng_state(tensors, json.loads(json.dumps(state["rng"])))
    got = (torch.rand(4), random.random(), np.random.rand(3), np.random.randn(1))
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]
    assert np.array_equal(got[2], expected[2]) and np.array_equal(got[3], expected[3])


def test_load_state_strict_names_the_file_and_the_mismatch():
    model = nn.Linear(3, 2)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_state_strict(model, {"weight": torch.zeros(2, 4), "bias": good["bias"]}, "/runs/a/model.safetensors (net)")
    message = str(info.value)
    assert "/runs/a/model.safetensors (net)" in message and "weight" in message and "(2, 4)" in message and "(2, 3)" in message
    with pytest.raises(CheckpointError) as info:
        load_state_strict(model, {"weight": good["weight"], "extra.x": torch.zeros(1)}, "file.safetensors")
    message = str(info.value)
    assert "file.safetensors" in message and "missing ['bias']" in message and "unexpected ['extra.x']" in message
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(before[k], good[k]) for k in good)   # a failed load changes nothing
    new = {k: torch.randn_like(v) for k, v in good.items()}
    load_state_strict(model, new, "ok")
    assert all(torch.equal(model.state_dict()[k], new[k]) for k in new)


def test_model_file_round_trip_and_meta(tmp_path):
    sd = {"net/w": torch.randn(4, 4), "net/steps": torch.arange(3)}
    meta = {"kind": "teacher", "net": {"hidden_size": 32}, "captions": ["a b", "c"]}
    path = tmp_path / "model.safetensors"
    save_model_file(path, sd, meta)
    tensors, got = load_model_file(path)
    assert got == meta == read_model_meta(path)
    assert torch.equal(tensors["net/w"], sd["net/w"]) and torch.equal(tensors["net/steps"], sd["net/steps"])
    save_model_file(path, sd, meta, dtype=torch.bfloat16)    # cast on save, float32 on load
    tensors, _ = load_model_file(path)
    assert tensors["net/w"].dtype == torch.float32
    assert torch.equal(tensors["net/w"], sd["net/w"].to(torch.bfloat16).float())
    assert tensors["net/steps"].dtype == torch.int64
    assert no_temp_files(tmp_path)


def test_model_file_errors_name_the_path(tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for fn in (read_model_meta, load_model_file):
        with pytest.raises(CheckpointError, match=f"{foreign}.*e2ediff"):
            fn(foreign)
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(CheckpointError, match=f"{missing}.*does not exist"):
        load_model_file(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not safetensors at all")
    with pytest.raises(CheckpointError, match=str(junk)):
        load_model_file(junk)


@pytest.mark.parametrize("damage", [truncate, flip_byte], ids=["truncated", "flipped-byte"])
def test_corrupted_model_file_is_detected(tmp_path, damage):
    path = tmp_path / "model.safetensors"
    save_model_file(path, {"net/w": torch.randn(64, 64)}, {"kind": "teacher"})
    damage(path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_model_file(path)
