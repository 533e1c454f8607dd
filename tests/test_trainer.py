"""The training loop: exact resume for every command, data order, non-finite skipping, the metrics log."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from e2ediff.checkpoint import latest_checkpoint, load_checkpoint
from e2ediff.config import OptimConfig, TrainConfig, from_dict
from e2ediff.trainer import BatchStream, Part, Task, TrainingStopped, train
from helpers import fake_env, fake_env_paths, pipeline_files, resolve_run, restore_determinism, training_data  # noqa: F401

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------------
# Exact resume


def make_task(command: str, cfg, files: dict[str, Path]):
    """A fresh task on pre-built data / models (seeded so that two constructions start from the same weights)."""
    from e2ediff.assets import load_autoencoder, load_pipeline

    torch.manual_seed(123)
    data = training_data(cfg)
    if command == "train-autoencoder":
        from e2ediff.autoencoder_training import AutoencoderTask
        return AutoencoderTask(cfg, CPU, data=data)
    if command == "pretrain":
        from e2ediff.pretrain import PretrainTask
        return PretrainTask(cfg, CPU, data=data, autoencoder=load_autoencoder(files["autoencoder"]))
    if command == "distill":
        from e2ediff.distill import DistillTask
        return DistillTask(cfg, CPU, data=data, teacher=load_pipeline(files["teacher"]))
    from e2ediff.e2e import FinetuneTask
    return FinetuneTask(cfg, CPU, data=data, init=load_pipeline(files["student"]))


def command_overrides(command: str, files: dict[str, Path]) -> list[str]:
    return {"train-autoencoder": [],
            "pretrain": [f"autoencoder={files['autoencoder']}", "optim.warmup_steps=3"],
            "distill": [f"teacher={files['teacher']}", "solver_steps=10", "optim.warmup_steps=3"],
            "finetune": [f"init={files['student']}", "optim.warmup_steps=3"]}[command]


def run(command: str, files, run_dir: Path, steps: int, *extra: str) -> dict:
    extra = [e.replace("{teacher}", str(files["teacher"])) for e in extra]   # a file of the fixture's
    cfg = resolve_run(command, *command_overrides(command, files), f"train.steps={steps}", *extra)
    return train(make_task(command, cfg, files), cfg.train, run_dir, cfg, command), cfg


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, sa = load_checkpoint(a)
    tb, sb = load_checkpoint(b)
    assert sorted(ta) == sorted(tb)
    different = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not different, f"tensors differ after resume: {different[:8]}"
    # step, optimizer hyper-parameters, schedulers, python + numpy RNG (the file sha256 is not compared: safetensors
    # writes its metadata map in a hash order that can differ between two writes of the same tensors)
    skip = {"tensors_sha256"}
    assert {k: v for k, v in sa.items() if k not in skip} == {k: v for k, v in sb.items() if k not in skip}


CASES = [("train-autoencoder", ()), ("pretrain", ()), ("distill", ()), ("finetune", ()),
         ("finetune", ("loss.gan=0.1",)), ("finetune", ("loss.gan=0.1", "loss.gan_group_std=true")),
         ("finetune", ("loss.anchor=1.0", "loss.anchor_refresh=2")),
         ("finetune", ("loss.anchor=1.0", "loss.anchor_to=teacher", "loss.teacher={teacher}", "loss.teacher_steps=3"))]


@pytest.mark.parametrize("command,extra", CASES, ids=["autoencoder", "pretrain", "distill", "finetune",
                                                      "finetune-gan", "finetune-gan-group-std",
                                                      "finetune-anchor-refresh", "finetune-teacher-anchor"])
def test_resume_is_bit_identical_to_a_straight_run(command, extra, fake_env, pipeline_files, tmp_path,
                                                   restore_determinism):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(command, pipeline_files, straight, 4, *extra)
    run(command, pipeline_files, resumed, 2, *extra)
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    run(command, pipeline_files, resumed, 4, *extra)

    final_a, final_b = straight / "checkpoints" / "step_00000004", resumed / "checkpoints" / "step_00000004"
    tensors, _ = load_checkpoint(final_a)
    parts = {k.split("/")[0] for k in tensors}
    assert {"optim", "rng", "ema"} <= parts
    if "loss.gan=0.1" in extra:  # the discriminator and its optimizer are checkpointed too
        assert any(k.startswith("disc/") for k in tensors) and any(k.startswith("optim/disc/") for k in tensors)
    if "loss.anchor_refresh=2" in extra:  # the anchor's refreshed model too
        assert any(k.startswith("extra/anchor/") for k in tensors)
    if command == "distill":  # the LCM target network
        assert any(k.startswith("extra/target/") for k in tensors)
    assert_same_checkpoint(final_a, final_b)
    from safetensors.torch import load_file
    ea, eb = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert sorted(ea) == sorted(eb) and all(torch.equal(ea[k], eb[k]) for k in ea)

    # The weights really moved, so equality is not trivial.
    first, _ = load_checkpoint(resumed / "checkpoints" / "step_00000002")
    name = next(k for k in tensors if k.split("/")[0] in ("net", "autoencoder") and tensors[k].is_floating_point()
                and tensors[k].numel() > 16)
    assert not torch.equal(first[name], tensors[name])

    # Both logs hold steps 1..4 with the same losses.
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (straight, resumed)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    key = next(k for k in logs[0][0] if k.startswith("loss/"))
    assert [r[key] for r in logs[0]] == [r[key] for r in logs[1]]


def test_config_written_to_run_folder_reloads_equal(fake_env, pipeline_files, tmp_path, restore_determinism):
    from e2ediff.pretrain import PretrainRun

    _, cfg = run("pretrain", pipeline_files, tmp_path / "r", 1)
    data = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert data["command"] == "pretrain"
    assert from_dict(PretrainRun, data) == cfg
    _, state = load_checkpoint(tmp_path / "r" / "checkpoints" / "step_00000001")
    assert from_dict(PretrainRun, state["config"]) == cfg and state["kind"] == "pretrain"


def test_resume_refuses_a_run_folder_of_another_command(fake_env, pipeline_files, tmp_path, restore_determinism):
    from e2ediff.checkpoint import CheckpointError

    run("train-autoencoder", pipeline_files, tmp_path / "r", 1)
    with pytest.raises(CheckpointError, match="autoencoder"):
        run("pretrain", pipeline_files, tmp_path / "r", 2)


def test_metrics_log_truncated_to_the_resumed_checkpoint(fake_env, pipeline_files, tmp_path, restore_determinism):
    """A run that logged steps 3-4 but whose step-4 checkpoint is corrupt resumes from step 2: the log keeps 1-2
    and the re-run appends 3-4 once, with the losses of a straight run."""
    d = tmp_path / "r"
    run("pretrain", pipeline_files, d, 4)
    before = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    (d / "checkpoints" / "step_00000004" / "tensors.safetensors").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="step_00000004"):
        run("pretrain", pipeline_files, d, 4)
    after = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert [r["loss/net"] for r in after] == [r["loss/net"] for r in before]


def test_finished_run_does_nothing_more(fake_env, pipeline_files, tmp_path, restore_determinism, capsys):
    d = tmp_path / "r"
    run("pretrain", pipeline_files, d, 2)
    lines = (d / "metrics.jsonl").read_text()
    run("pretrain", pipeline_files, d, 2)
    assert "nothing to do" in capsys.readouterr().err
    assert (d / "metrics.jsonl").read_text() == lines


# ----------------------------------------------------------------------------------------------------------------------
# Data order


def test_batch_stream_is_history_free_and_epochs_are_permutations():
    n, b = 20, 8
    a = BatchStream(n, b, seed=3)
    seq = [a.indices(s) for s in range(10)]            # 80 positions = 4 epochs of 20
    for s in (7, 0, 9, 3):                              # a fresh stream, steps in any order, gives the same batches
        assert torch.equal(BatchStream(n, b, seed=3).indices(s), seq[s])
    flat = torch.cat(seq)
    epochs = flat.view(4, n)
    for e in range(4):
        assert torch.equal(epochs[e].sort().values, torch.arange(n)), f"epoch {e} is not a permutation"
    assert not torch.equal(epochs[0], epochs[1])        # a new order each epoch
    assert not torch.equal(BatchStream(n, b, seed=4).indices(0), seq[0])   # the seed matters
    # Split over two processes: rank 0 and rank 1 together are the single-process batch.
    for s in range(3):
        halves = [BatchStream(n, b, seed=3, rank=r, world=2).indices(s) for r in range(2)]
        assert torch.equal(torch.cat(halves), seq[s])
    with pytest.raises(ValueError, match="divisible"):
        BatchStream(n, 7, seed=0, world=2)
    with pytest.raises(ValueError, match="empty"):
        BatchStream(0, 8, seed=0)


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite losses


class ToyTask(Task):
    """Linear regression; the loss is NaN on the steps in ``bad`` (from ``bad_from`` on, every step)."""

    kind = "toy"

    def __init__(self, bad: set[int] = frozenset(), bad_from: int | None = None):
        torch.manual_seed(0)
        self.net = nn.Linear(4, 1)
        self.parts = [Part("net", self.net, OptimConfig(lr=0.1, grad_clip=0.0), 0.5)]
        self.bad, self.bad_from = set(bad), bad_from
        self.seen: dict[int, torch.Tensor] = {}    # weights at the start of each step

    def losses(self, step, generator):
        self.seen[step] = self.net.weight.detach().clone()
        x = torch.randn(8, 4, generator=generator)
        loss = (self.module("net")(x).squeeze(1) - x.sum(1)).pow(2).mean()
        if step in self.bad or (self.bad_from is not None and step >= self.bad_from):
            loss = loss * float("nan")
        return {"net": loss}, {}


def toy_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 8, "device": "cpu", "progress": False, "log_every": 1,
                          "checkpoint_every": 100, **kw})


def test_nonfinite_steps_are_skipped_with_a_warning(tmp_path):
    task = ToyTask(bad={2, 3})
    with pytest.warns(UserWarning, match="non-finite") as record:
        train(task, toy_cfg(), tmp_path, toy_cfg(), "toy")
    assert sum("non-finite" in str(w.message) for w in record) == 2
    assert torch.equal(task.seen[2], task.seen[3]) and torch.equal(task.seen[3], task.seen[4])  # skipped: unchanged
    assert not torch.equal(task.seen[1], task.seen[2]) and not torch.equal(task.seen[4], task.seen[5])
    tensors, state = load_checkpoint(tmp_path / "checkpoints" / "step_00000006")
    assert int(tensors["optim/net/state/0/step"]) == 4            # AdamW stepped on the 4 good steps only
    assert state["sched"]["net"]["last_epoch"] == 4


def test_too_many_nonfinite_steps_stop_after_a_checkpoint(tmp_path):
    task = ToyTask(bad_from=2)
    cfg = toy_cfg(max_nonfinite=3, steps=10)
    with pytest.warns(UserWarning, match="non-finite"):
        with pytest.raises(TrainingStopped) as info:
            train(task, cfg, tmp_path, cfg, "toy")
    message = str(info.value)
    assert "3 non-finite steps in a row" in message and "train.max_nonfinite=3" in message
    found = latest_checkpoint(tmp_path)
    assert found is not None and found[0].name == "step_00000005" and found[2]["step"] == 5
    assert torch.equal(found[1]["net/weight"], task.seen[2])      # the weights of the last good step
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]                                   # step 5 raised before it was logged


class InfiniteGradient(torch.autograd.Function):
    """Identity forward (finite loss), infinite gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_nonfinite_gradient_is_skipped(tmp_path):
    class Task2(ToyTask):
        def losses(self, step, generator):
            losses, logs = super().losses(step, generator)
            if step == 1:
                losses["net"] = InfiniteGradient.apply(losses["net"])
            return losses, logs

    task = Task2()
    with pytest.warns(UserWarning, match="non-finite loss or gradient") as record:
        train(task, toy_cfg(steps=3), tmp_path, toy_cfg(steps=3), "toy")
    assert len([w for w in record if "non-finite" in str(w.message)]) == 1
    assert torch.equal(task.seen[1], task.seen[2]) and not torch.equal(task.seen[0], task.seen[1])
