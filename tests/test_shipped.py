"""The shipped checkpoints (checkpoints/): sizes, checksums, kinds, presets, one shared autoencoder per preset; and
`e2ediff convert`, which made their float16 files."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from e2ediff.assets import load_autoencoder, load_pipeline
from e2ediff.checkpoint import load_model_file, read_model_meta, split_prefix
from e2ediff.cli import main
from e2ediff.generate import SamplerSpec
from e2ediff.models.autoencoder import PRESETS as AE_PRESETS
from e2ediff.models.dit import PRESETS as DIT_PRESETS
from helpers import all_tensors, fake_env, fake_env_paths, pipeline_files, run_error  # noqa: F401

ROOT = Path(__file__).resolve().parents[1] / "checkpoints"
KINDS = ("lcm", "e2e")                              # file name = the kind in its metadata
MAX_BYTES = 16_000_000
TREE_LIMIT = 64 * 2**20                              # the whole tracked tree travels to a GPU machine (64 MiB a call)


def test_tracked_tree_fits_one_device_call():
    """Every tracked file together stays under 64 MiB, so the checkout travels to a GPU machine as it is."""
    import subprocess

    repo = ROOT.parent
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    files = [repo / f for f in out.decode().split("\0") if f]
    total = sum(f.stat().st_size for f in files if f.is_file())
    assert total <= TREE_LIMIT, f"tracked files total {total / 2**20:.1f} MiB > 64 MiB"


def test_shipped_pipeline_files():
    preset = "base"
    folder = ROOT / preset
    ae_tensors, ae_meta = load_model_file(folder / "autoencoder.safetensors")   # checks the sha256 of the data
    assert ae_meta["kind"] == "autoencoder"
    expected_ae = AE_PRESETS[preset]
    assert tuple(ae_meta["autoencoder"]["channels"]) == tuple(expected_ae.channels)
    for kind in KINDS:
        path = folder / f"{kind}.safetensors"
        assert path.stat().st_size <= MAX_BYTES, f"{path} is {path.stat().st_size} bytes"
        tensors, meta = load_model_file(path)
        assert meta["kind"] == kind
        for key in ("hidden_size", "depth", "num_heads", "patch_size"):
            assert meta["net"][key] == getattr(DIT_PRESETS[preset], key), (path, key)
        # every pipeline of a preset carries the same autoencoder as the shipped autoencoder file
        embedded = split_prefix(tensors, "autoencoder")
        assert embedded.keys() == split_prefix(ae_tensors, "autoencoder").keys()
        for k, v in split_prefix(ae_tensors, "autoencoder").items():
            assert torch.equal(embedded[k].half(), v.half()), (path, k)   # equal to float16 precision
        raw = all_tensors(path)                              # as stored (load_model_file returns float32)
        assert all(v.dtype == torch.float16 for k, v in raw.items() if k.startswith("net/")), path
    # the E2E model is a fine-tune of the shipped student, not a copy of it
    student, e2e = all_tensors(folder / "lcm.safetensors"), all_tensors(folder / "e2e.safetensors")
    assert any(not torch.equal(student[k], e2e[k]) for k in student if k.startswith("net/"))
    spec = {name: SamplerSpec.from_meta(read_model_meta(folder / f"{name}.safetensors")) for name in ("e2e", "lcm")}
    assert spec["e2e"] == spec["lcm"]                   # the student's default sampler (w, timesteps, LCM boundary)


def test_shipped_base_one_step_model():
    path = ROOT / "base" / "e2e_1step.safetensors"
    assert path.stat().st_size <= MAX_BYTES
    meta = read_model_meta(path)
    assert meta["kind"] == "e2e" and meta["sampler"]["timesteps"] == [999]   # samples in one step by default


def test_shipped_base_models_load_into_float32_modules():
    pipe = load_pipeline(ROOT / "base" / "lcm.safetensors")
    assert pipe.denoiser.net.config.guidance_embed              # an LCM student
    assert replace(pipe.denoiser.net.config, guidance_embed=False) == DIT_PRESETS["base"]
    assert all(p.dtype == torch.float32 for p in pipe.denoiser.parameters())
    ae = load_autoencoder(ROOT / "base" / "autoencoder.safetensors")
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        rec = ae.decode_latents(ae.encode_latents(x))
    assert rec.shape == x.shape and torch.isfinite(rec).all()


def test_convert_to_float16_and_back(pipeline_files, tmp_path, capsys):
    src = pipeline_files["student"]
    half, full = tmp_path / "half.safetensors", tmp_path / "full.safetensors"
    assert main(["convert", str(src), str(half)]) == 0
    assert "float16" in capsys.readouterr().out
    t32, meta32 = all_tensors(src), load_model_file(src)[1]
    t16, meta16 = all_tensors(half), load_model_file(half)[1]   # checksum recomputed and valid
    assert meta16 == meta32
    assert t16.keys() == t32.keys()
    for k, v in t32.items():
        assert t16[k].dtype == (torch.float16 if v.is_floating_point() else v.dtype)
        assert torch.equal(t16[k], v.to(t16[k].dtype)), k  # a plain cast, nothing else
    assert half.stat().st_size < 0.6 * src.stat().st_size
    assert main(["convert", str(half), str(full), "--dtype", "float32"]) == 0
    t_back = all_tensors(full)
    assert all(torch.equal(t_back[k], t16[k].to(t_back[k].dtype)) for k in t16)
    pipe32, pipe16 = load_pipeline(src), load_pipeline(half)   # a float16 file loads into float32 modules
    p32 = dict(pipe32.denoiser.named_parameters())
    for name, p in pipe16.denoiser.named_parameters():
        assert p.dtype == torch.float32
        assert torch.allclose(p, p32[name], rtol=1e-3, atol=1e-4), name


def test_convert_refuses_its_input_and_missing_files(pipeline_files, tmp_path, capsys):
    src = pipeline_files["student"]
    msg = run_error(capsys, "convert", src, src, untouched=(src,))
    assert "is the input file" in msg and str(src) in msg
    msg = run_error(capsys, "convert", tmp_path / "missing.safetensors", tmp_path / "out.safetensors")
    assert "missing.safetensors" in msg and "does not exist" in msg
    assert not (tmp_path / "out.safetensors").exists()
