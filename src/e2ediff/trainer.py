"""The one training loop every command uses (autoencoder, teacher, LCM distillation, E2E fine-tuning).

A command describes its work as a ``Task``: the trained parts (a module, its optimizer settings, its EMA decay), how
to draw the batch of a given step, and the loss of each part. The loop owns everything else: accelerate (one process
is world size 1), AdamW, warm-up, gradient clipping, EMA, non-finite skipping, logging, atomic checkpoints and exact
resume.

Reproducibility: every random draw of step ``s`` on process ``r`` comes from a generator seeded by
``(seed, s, r)``, and the data order of each epoch is a permutation seeded by ``(seed, epoch)``. A resumed run
therefore sees exactly the batches and noises of an uninterrupted one; the checkpoint holds weights, EMA, optimizer
state and the global RNG states as well.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from e2ediff.checkpoint import (atomic_write_bytes, latest_checkpoint, load_optimizer_state, load_rng_state, load_state_strict,
                                optimizer_state_tensors, rng_state, save_checkpoint, save_model_file,
                                saved_optimizer_state, split_prefix, with_prefix, CheckpointError, TRAINING_FIELDS)
from e2ediff.config import OptimConfig, TrainConfig, dump_yaml, to_dict
from e2ediff.guards import config_changes, describe_changes
from e2ediff.ema import EMA


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (e.g. too many non-finite steps); a checkpoint was written first."""


@dataclass
class Part:
    """One trained module with its optimizer; ``name`` prefixes its tensors in the checkpoint."""

    name: str
    module: nn.Module
    optim: OptimConfig
    ema_decay: float = 0.0
    trainable_only: bool = False         # checkpoints and EMA hold the trainable parameters only (LoRA, frozen bases)
    ddp: bool = False                    # several processes: DistributedDataParallel through accelerator.prepare,
                                         # or FSDP2 under an FSDP accelerate config (e2ediff.fsdp)
                                         # (the module's forward must be the whole step: one call per backward)
    compile: bool = True                 # train.compile applies; off for a discriminator whose R1 penalty
                                         # differentiates it twice (a compiled backward with donated buffers refuses)


def part_state(part: Part, module: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of a part: its state dict, or only its trainable parameters."""
    if not part.trainable_only:
        return module.state_dict()
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def load_part_state(part: Part, module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    if not part.trainable_only:
        load_state_strict(module, tensors, source)
        return
    own = {n: p for n, p in module.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    shapes = [n for n in own if n in tensors and tensors[n].shape != own[n].shape]
    if missing or extra or shapes:
        raise CheckpointError(f"{source} does not fit the trainable parameters: missing {missing[:4]}, "
                              f"unexpected {extra[:4]}, shape mismatch {shapes[:4]}")
    with torch.no_grad():
        for n, p in own.items():
            p.copy_(tensors[n])


class Task:
    """What a command gives the loop. Subclasses set ``parts`` and implement ``losses``."""

    kind: str = "task"
    parts: list[Part]

    def losses(self, step: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Draw the step's batch and return ({part name: scalar loss}, {log name: value})."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after the optimizer steps of ``step`` (e.g. the LCM target network's EMA)."""

    def before_sharding(self) -> None:
        """Called on every process before FSDP shards the ``ddp`` parts: keep what ``export`` needs whole (it runs on
        process 0 with whole weights, while the parts' modules hold only their shards from now on)."""

    def frozen_networks(self) -> list[nn.Module]:
        """Networks that run every step without gradients (an anchor's model, a teacher): under ``train.compile`` they
        are compiled too, with inductor's default mode (CUDA graphs are left to the trained parts)."""
        return []

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def export(self, weights: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict] | None:
        """What ``model.safetensors`` holds, given each part's sampling weights (its EMA where it has one):
        (tensors, metadata), or None for nothing."""
        return None

    def ema_weights(self, name: str) -> dict[str, torch.Tensor] | None:
        """Part ``name``'s EMA weights (its state-dict names) as the loop keeps them, or None without an EMA: for a
        task whose ``after_step`` copies them (e.g. the E2E anchor's refresh). Whole weights unless FSDP shards."""
        ema = getattr(self, "_emas", {}).get(name)
        return None if ema is None else ema.shadow

    def module(self, name: str) -> nn.Module:
        """The module of part ``name`` as the loop prepared it (DDP-wrapped on several GPUs): call this in ``losses``."""
        prepared = getattr(self, "_prepared", None)
        if prepared is not None:
            return prepared[name]
        return next(p.module for p in self.parts if p.name == name)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{step}/{rank}".encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


class BatchStream:
    """Indices of the batch of step ``s``: epoch-wise permutations seeded by (seed, epoch), split over processes."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int | None = None, world: int | None = None):
        # Several processes (accelerate launch / torchrun): each takes its slice of the global batch.
        rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        world = int(os.environ.get("WORLD_SIZE", 1)) if world is None else world
        if n < 1:
            raise ValueError("the training set is empty")
        if batch_size % world:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by the number of processes ({world})")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self._cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache[epoch] = torch.randperm(self.n, generator=g)
        return self._cache[epoch]

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        pos = torch.arange(start, start + self.batch_size)
        epochs, offsets = pos // self.n, pos % self.n
        idx = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            sel = epochs == e
            idx[sel] = self._perm(e)[offsets[sel]]
        per = self.batch_size // self.world
        return idx[self.rank * per:(self.rank + 1) * per]


def _all_processes(accelerator, flag: bool) -> bool:
    """True when ``flag`` holds on every process: one decision for all, so that no process skips a collective (a
    non-finite step skipped on one process only would leave the others waiting in their gradient all-reduce)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _any_process(accelerator, flag: bool) -> bool:
    """True when ``flag`` holds on some process (e.g. process 0's time limit), the same answer everywhere."""
    return not _all_processes(accelerator, not flag)


def _average_gradients(params: list[torch.Tensor], world: int) -> None:
    """Mean of every gradient over the processes (a missing gradient counts as zero on that process)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)


def _apply_changed_optim(task: Task, optimizers: dict, schedulers: dict) -> None:
    """A resume with a changed config: the loaded optimizer and scheduler carry the old hyper-parameters; apply the new."""
    for part in task.parts:
        o, sched = part.optim, schedulers[part.name]
        sched.base_lrs = [o.lr for _ in sched.base_lrs]
        sched.lr_lambdas = [_lr_lambda(o.warmup_steps) for _ in sched.lr_lambdas]
        for group in optimizers[part.name].param_groups:
            group.update(initial_lr=o.lr, lr=o.lr * _lr_lambda(o.warmup_steps)(sched.last_epoch),
                         betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available; under `accelerate launch` / torchrun, cuda means this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device={name} but no CUDA device is available")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    return torch.device(name)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a blank or torn line (a run killed while writing it)."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else math.inf
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class MetricsLog:
    """metrics.jsonl (truncated to the resume step) + tensorboard when installed."""

    def __init__(self, run_dir: Path, resume_step: int, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _logged_step(line) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except Exception as e:  # tensorboard missing on a bare GPU image: the JSONL log still works
            warnings.warn(f"tensorboard logging disabled: {e}", stacklevel=2)

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _exported_step(path: Path) -> int | None:
    """The step recorded in a run's model file, or None when it is missing or unreadable."""
    from e2ediff.checkpoint import read_model_meta

    try:
        return read_model_meta(path).get("step")
    except CheckpointError:
        return None


def _lr_lambda(warmup: int) -> Callable[[int], float]:
    return lambda s: 1.0 if warmup <= 0 else min(1.0, (s + 1) / warmup)


def train(task: Task, cfg: TrainConfig, run_dir: Path, run_config: Any, command: str,
          accelerator=None, allow_changed: bool = False) -> dict[str, float]:
    """Run (or resume) ``task`` up to ``cfg.steps`` optimizer steps. Returns the last logged values.

    A resume whose config differs from the checkpoint's (beyond ``guards.RESUMABLE_KEYS``) is refused, or with
    ``allow_changed`` applied (optimizer hyper-parameters included) and recorded in ``RUN/config_changes.jsonl``."""
    from accelerate import Accelerator

    run_dir = Path(run_dir)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    if accelerator is None:
        device = resolve_device(cfg.device)
        # "auto": what `accelerate launch --mixed_precision` / the accelerate config say (no when neither does)
        accelerator = Accelerator(cpu=device.type == "cpu",
                                  mixed_precision=None if cfg.mixed_precision == "auto" else cfg.mixed_precision)
    main = accelerator.is_main_process
    sharded = accelerator.distributed_type.name == "FSDP"   # the ddp parts go through accelerate's FSDP2 instead
    if sharded:
        from e2ediff import fsdp   # torch.distributed, only where it runs

        fsdp.check_fsdp(accelerator, task.parts)
    if main and accelerator.mixed_precision != "no":
        print(f"mixed precision: {accelerator.mixed_precision}", file=sys.stderr)
    if accelerator.device.type == "cuda":  # TF32 matmuls: ~3e-4 relative, fine for training, much faster
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    optimizers, schedulers, emas = {}, {}, {}
    for part in task.parts:
        part.module.to(accelerator.device)
        params = [p for p in part.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"part {part.name!r} has no trainable parameters")
        o = part.optim
        fused = accelerator.device.type == "cuda"   # one kernel for the whole update instead of one per tensor
        optimizers[part.name] = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                                  weight_decay=o.weight_decay, fused=fused)
        schedulers[part.name] = torch.optim.lr_scheduler.LambdaLR(optimizers[part.name], _lr_lambda(o.warmup_steps))
        if part.ema_decay > 0:
            emas[part.name] = EMA(part.module, part.ema_decay, trainable_only=part.trainable_only)

    task._emas = emas
    # Resume from the newest good checkpoint of this run folder.
    start = skipped = nonfinite = 0
    changes: dict = {}
    deferred_optim: dict[str, dict] = {}   # FSDP parts: loaded once fully_shard has replaced the optimizer's parameters
    found = latest_checkpoint(run_dir, TRAINING_FIELDS)
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    if found is None and saved:   # starting over would let pruning delete the new checkpoints, not the bad ones
        raise CheckpointError(f"{run_dir / 'checkpoints'} holds {len(saved)} checkpoints ({saved[-1]} the newest) "
                              f"and none of them verifies; move them away or use another --run-dir")
    if found is not None:
        path, tensors, state = found
        saved_kind = state.get("kind")
        if saved_kind != task.kind:
            raise CheckpointError(f"{path} was written by {saved_kind!r} training, not {task.kind!r}; "
                                  f"use another --run-dir")
        for part in task.parts:
            try:
                load_part_state(part, part.module, split_prefix(tensors, f"{part.name}"), f"{path} ({part.name})")
            except CheckpointError as e:
                raise CheckpointError(f"{e}; resume with the config the run was started with "
                                      f"({run_dir / 'config.yaml'}) or use another --run-dir") from None
            if sharded and part.ddp:
                deferred_optim[part.name] = saved_optimizer_state(f"optim/{part.name}", tensors,
                                                                  state["optim"][part.name])
            else:
                load_optimizer_state(optimizers[part.name], f"optim/{part.name}", tensors, state["optim"][part.name])
            schedulers[part.name].load_state_dict(state["sched"][part.name])
            if part.name in emas:
                emas[part.name].load_state_dict(split_prefix(tensors, f"ema/{part.name}"))
        task.load_extra_tensors(split_prefix(tensors, "extra"))
        load_rng_state(tensors, state["rng"])
        start = int(state["step"])
        skipped, nonfinite = int(state.get("skipped_steps", 0)), int(state.get("nonfinite_in_row", 0))
        changes = config_changes(state["config"], json.loads(json.dumps(to_dict(run_config))),
                                 json.loads(json.dumps(to_dict(type(run_config)()))))
        if changes and not allow_changed:
            raise CheckpointError(f"{run_dir} was started with another config ({describe_changes(changes)}); "
                                  f"rerun with the config in {run_dir / 'config.yaml'}, or pass --allow-changed to "
                                  f"apply the change from step {start} (recorded in config_changes.jsonl)")
        if changes:
            _apply_changed_optim(task, optimizers, schedulers)
        if main:
            print(f"resumed from {path} at step {start}", file=sys.stderr)
    if main:  # only now: a run folder that cannot be resumed keeps the config it was started with
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(run_config, run_dir / "config.yaml", command=command)
        if changes:
            with open(run_dir / "config_changes.jsonl", "a") as f:
                f.write(json.dumps({"step": start, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                    "changes": {k: list(v) for k, v in changes.items()}}) + "\n")
            print(f"resumed with changed config at step {start}: {describe_changes(changes)}", file=sys.stderr)

    # Modules are not wrapped in DistributedDataParallel: the unrolled sampler calls the same network K times before
    # one backward (and a GAN uses its discriminator twice), which DDP's reducer does not allow without a static
    # graph. Gradients are averaged over processes explicitly after each backward instead (_average_gradients).
    if cfg.compile != "no":   # in place: parameter names, checkpoints and exports are unchanged
        for part in (p for p in task.parts if p.compile):
            part.module.compile(mode=None if cfg.compile == "default" else cfg.compile)
        for net in task.frozen_networks():
            net.compile()
    if sharded:
        # FSDP2 (every part is a ddp part: fsdp.check_fsdp): each is sharded with its optimizer (accelerate swaps the
        # optimizer's parameters for the shards); its saved optimizer state is loaded only now, and its EMA is split
        # like its parameters.
        task.before_sharding()
        task._prepared, opts = {}, {}
        for p in task.parts:
            task._prepared[p.name], opts[p.name] = accelerator.prepare(p.module, optimizers[p.name])
            if p.name in deferred_optim:
                fsdp.load_whole_optimizer_state(p.module, optimizers[p.name], deferred_optim[p.name])
            if p.name in emas:
                emas[p.name].shadow = fsdp.shard_like(emas[p.name].shadow, p.module)
        if deferred_optim and changes:
            _apply_changed_optim(task, optimizers, schedulers)
    else:
        # A part with ddp=True (one forward call per step that runs the whole unrolled sampler inside) is wrapped in
        # DDP.
        task._prepared = {p.name: accelerator.prepare_model(p.module) if p.ddp and accelerator.num_processes > 1
                          else p.module for p in task.parts}
        prepared_opts = accelerator.prepare(*[optimizers[p.name] for p in task.parts])
        if len(task.parts) == 1:
            prepared_opts = [prepared_opts]
        opts = {p.name: o for p, o in zip(task.parts, prepared_opts)}

    def part_states() -> dict[str, tuple[dict, dict, dict | None]]:
        """(weights as the checkpoint holds them, optimizer state dict, EMA or None) of each part, whole, on process 0.
        Collective under FSDP: every process calls it, the sharded parts are gathered onto process 0."""
        states = {}
        for part in task.parts:
            module, ema = accelerator.unwrap_model(part.module), emas.get(part.name)
            if sharded and part.ddp:
                states[part.name] = (fsdp.whole_model_state(module, part.trainable_only),
                                     fsdp.whole_optimizer_state(module, optimizers[part.name]),
                                     None if ema is None else fsdp.whole_tensors(ema.state_dict(), main))
            elif main:
                states[part.name] = (part_state(part, module), optimizers[part.name].state_dict(),
                                     None if ema is None else ema.state_dict())
        return states

    def write_checkpoint(step: int) -> None:
        accelerator.wait_for_everyone()
        states = part_states()
        if not main:
            return
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"kind": task.kind, "config": to_dict(run_config), "command": command,
                                "optim": {}, "sched": {}, "mixed_precision": str(accelerator.mixed_precision),
                                "num_processes": accelerator.num_processes, "skipped_steps": skipped,
                                "nonfinite_in_row": nonfinite}
        for part in task.parts:
            weights, optim, ema = states[part.name]
            tensors.update(with_prefix(weights, part.name))
            t, m = optimizer_state_tensors(optim, f"optim/{part.name}")
            tensors.update(t)
            meta["optim"][part.name] = m
            meta["sched"][part.name] = schedulers[part.name].state_dict()
            if ema is not None:
                tensors.update(with_prefix(ema, f"ema/{part.name}"))
        tensors.update(with_prefix(task.extra_tensors(), "extra"))
        rng_tensors, rng_meta = rng_state()
        tensors.update(rng_tensors)
        meta["rng"] = rng_meta
        save_checkpoint(run_dir, step, tensors, meta, keep_last=cfg.keep_last)
        if skipped < step:   # a model that no step ever updated is not exported
            export_model(step, states)
        # The export may draw from the global RNGs (e.g. building a module); a resumed run restarts from the state
        # saved above, so the uninterrupted run must continue from that same state.
        load_rng_state(rng_tensors, rng_meta)

    def export_model(step: int, states: dict[str, tuple[dict, dict, dict | None]]) -> None:
        """``states``: part_states(); its weights of an FSDP part without EMA hold what its checkpoint holds (the
        trainable parameters only with ``trainable_only``)."""
        weights = {p.name: states[p.name][2] if p.name in emas
                   else states[p.name][0] if sharded and p.ddp
                   else accelerator.unwrap_model(p.module).state_dict() for p in task.parts}
        exported = task.export(weights)
        if exported is not None:
            model_tensors, model_meta = exported
            save_model_file(run_dir / "model.safetensors", model_tensors,
                            {**model_meta, "step": step, "run_config": to_dict(run_config), "command": command})
            if cfg.keep_exports:   # the same bytes, kept per step for selection on the validation split
                atomic_write_bytes(run_dir / "exports" / f"model_step_{step:08d}.safetensors",
                                   (run_dir / "model.safetensors").read_bytes())

    log = MetricsLog(run_dir, start, main)
    last: dict[str, float] = {}
    t0 = time.perf_counter()
    progress = None
    if cfg.progress and main and start < cfg.steps:
        from tqdm.auto import tqdm

        progress = tqdm(total=cfg.steps, initial=start, desc=command, dynamic_ncols=True, file=sys.stderr)
    step = start
    try:
        for step in range(start, cfg.steps):
            gen = step_generator(cfg.seed, step, accelerator.process_index, accelerator.device)
            with accelerator.autocast():
                losses, logs = task.losses(step, gen)
            ok = _all_processes(accelerator, all(torch.isfinite(v).all() for v in losses.values()))
            grad_norms = {}
            if ok:
                for part in task.parts:
                    if part.name not in losses:      # a part that does not train this step (disc_warmup)
                        continue
                    opt = opts[part.name]
                    opt.zero_grad(set_to_none=True)
                    accelerator.backward(losses[part.name])
                    params = [p for g in optimizers[part.name].param_groups for p in g["params"]]
                    if accelerator.num_processes > 1 and not part.ddp:   # DDP parts are averaged in backward
                        _average_gradients(params, accelerator.num_processes)
                    clip = part.optim.grad_clip if part.optim.grad_clip > 0 else math.inf
                    norm = accelerator.clip_grad_norm_(params, clip)
                    norm = float(norm) if norm is not None else 0.0
                    grad_norms[part.name] = norm
                    if not math.isfinite(norm):
                        opt.zero_grad(set_to_none=True)
                        ok = False
                        break
                    opt.step()
                    schedulers[part.name].step()
                    if part.name in emas:
                        emas[part.name].update(accelerator.unwrap_model(part.module), step)
            if ok:
                nonfinite = 0
                task.after_step(step)
            else:
                nonfinite += 1
                skipped += 1
                for opt in opts.values():
                    opt.zero_grad(set_to_none=True)
                warnings.warn(f"step {step + 1}: non-finite loss or gradient "
                              f"({ {k: float(v.detach()) for k, v in losses.items()} }, grad norms {grad_norms}); "
                              f"step skipped ({nonfinite} in a row)", stacklevel=2)
                if nonfinite >= cfg.max_nonfinite:
                    write_checkpoint(step + 1)
                    raise TrainingStopped(
                        f"stopped at step {step + 1}: {nonfinite} non-finite steps in a row "
                        f"(train.max_nonfinite={cfg.max_nonfinite}); checkpoint written to {run_dir}/checkpoints. "
                        f"Lower the learning rate or check the data.")
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                last = {**{f"loss/{k}": float(v.detach()) for k, v in losses.items()},
                        **{f"grad_norm/{k}": v for k, v in grad_norms.items()},
                        **{k: float(v) for k, v in logs.items()},
                        "lr": schedulers[task.parts[0].name].get_last_lr()[0],
                        "sec_per_step": (time.perf_counter() - t0) / max(1, done - start)}
                log.write(done, last)
                if progress is not None:
                    progress.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in last.items()
                                          if k.startswith("loss/")})
            if progress is not None:
                progress.update(1)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                write_checkpoint(done)
            # every process stops at the same step (process 0's clock decides), or the next collective hangs
            if cfg.max_seconds > 0 and done < cfg.steps and _any_process(
                    accelerator, accelerator.is_main_process and time.perf_counter() - t0 >= cfg.max_seconds):
                if done % cfg.checkpoint_every != 0:
                    write_checkpoint(done)
                if main:
                    print(f"time limit: stopped at step {done} after train.max_seconds={cfg.max_seconds:g} s; "
                          f"run again to continue toward train.steps={cfg.steps}", file=sys.stderr)
                break
        if 0 < max(start, cfg.steps) <= skipped and main:
            raise TrainingStopped(f"every one of the {skipped} steps of this run was non-finite (skipped); no model "
                                  f"was exported. Lower the learning rate or check the data.")
        if start >= cfg.steps:
            states = part_states()   # collective under FSDP
            if main:
                print(f"nothing to do: the run is already at step {start} >= train.steps={cfg.steps}", file=sys.stderr)
                if found is not None and _exported_step(run_dir / "model.safetensors") != start:
                    export_model(start, states)   # killed between the last checkpoint and its export: finish it
    finally:
        if progress is not None:
            progress.close()
        log.close()
    return last
