"""Typed configuration: dataclasses with presets, YAML in, dotted overrides, strict validation.

Every command has one dataclass (``AutoencoderRun``, ``PretrainRun``, ``DistillRun``, ``FinetuneRun``) made of the
shared sections below. A config is resolved in this order: the command's preset (``tiny`` or ``base``), then a YAML
file, then ``key.sub=value`` overrides from the command line. Unknown keys, wrong types and impossible values are
rejected with a message that names the dotted key. The resolved config is written into every run folder.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from e2ediff.guards import MAX_BATCH, MAX_TRAIN_STEPS, bounded_yaml, clip, short


class ConfigError(ValueError):
    """A config key, type or value that cannot be used; the message names the dotted key."""


# ----------------------------------------------------------------------------------------------------------------------
# Shared sections


@dataclass
class DataConfig:
    dataset: Literal["fashion-mnist", "folder", "fashion-scenes"] = "fashion-mnist"
    data_dir: str | None = None          # Fashion-MNIST IDX folder (searched for when None) or the image folder root
    captions_file: str | None = None     # folder dataset: captions.jsonl (default: <data_dir>/captions.jsonl)
    image_channels: int = 1              # folder dataset: 1 (grayscale) or 3 (RGB)
    val_size: int = 5000                 # images held out of the train split for model selection (never the test split)
    caption_dropout: float = 0.1         # probability of the null caption in training (classifier-free guidance)
    prompt_cache: str | None = None      # caption-embedding cache (safetensors); default <cache dir>/prompts-<key>.safetensors
    skip_bad_files: bool = False         # folder dataset: skip unreadable images with a counted warning
    num_scenes: int = 0                  # fashion-scenes: scenes per split (0: train 60000, val 5000, test 10000)

    def validate(self) -> None:
        _check(0 <= self.caption_dropout < 1, "data.caption_dropout", self.caption_dropout, "a probability in [0, 1)")
        _check(self.val_size >= 0, "data.val_size", self.val_size, ">= 0")
        _check(self.image_channels in (1, 3), "data.image_channels", self.image_channels, "1 or 3")
        _check(self.num_scenes >= 0, "data.num_scenes", self.num_scenes, ">= 0")


@dataclass
class OptimConfig:
    lr: float = 1e-4                     # AdamW learning rate
    weight_decay: float = 0.0            # AdamW weight decay (decoupled)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0               # max global grad norm; 0 disables clipping
    warmup_steps: int = 0                # linear learning-rate warm-up

    def validate(self, prefix: str = "optim") -> None:
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "> 0")
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{prefix}.beta1/beta2", (self.beta1, self.beta2), "in [0, 1)")
        _check(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, ">= 0 (0 disables)")
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, ">= 0")


@dataclass
class TrainConfig:
    steps: int = 1000                    # optimizer steps in total (a resumed run continues up to this number)
    batch_size: int = 64                 # images per optimizer step, over all processes
    seed: int = 0                        # every random draw derives from (seed, step, process)
    ema_decay: float = 0.999             # EMA of the trained weights, used for sampling; 0 disables; warm-up
                                         # min(decay, (1 + s)/(10 + s)) at step s
    log_every: int = 10                  # steps between metric lines (JSONL + tensorboard)
    checkpoint_every: int = 500          # steps between checkpoints (one is always written at the end)
    keep_last: int = 3                   # checkpoints kept; older ones are deleted after a newer one is complete
    device: str = "auto"                 # auto | cpu | cuda
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"  # auto: the accelerate launcher's / config's
    deterministic: bool = False          # torch.use_deterministic_algorithms (bit-exact resume on CPU)
    max_nonfinite: int = 10              # non-finite losses/gradients in a row that stop the run (after a checkpoint)
    progress: bool = True                # progress bar
    keep_exports: bool = False           # also keep every checkpoint's model file as exports/model_step_N.safetensors
                                         # (validation early stopping: scripts/select_export.py picks one on val)
    compile: Literal["no", "default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "no"  # torch.compile the
                                         # trained networks in place (reduce-overhead: CUDA graphs, for small models)
    max_seconds: float = 0.0             # > 0: stop after this many seconds of training (checkpoint written; a rerun
                                         # resumes toward train.steps)

    def validate(self) -> None:
        _check(1 <= self.steps <= MAX_TRAIN_STEPS, "train.steps", self.steps, f"in [1, {MAX_TRAIN_STEPS}]")
        _check(1 <= self.batch_size <= MAX_BATCH, "train.batch_size", self.batch_size, f"in [1, {MAX_BATCH}]")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", self.ema_decay, "in [0, 1)")
        _check(self.log_every >= 1, "train.log_every", self.log_every, ">= 1")
        _check(self.checkpoint_every >= 1, "train.checkpoint_every", self.checkpoint_every, ">= 1")
        _check(self.keep_last >= 1, "train.keep_last", self.keep_last, ">= 1")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "train.device",
               self.device, "auto, cpu, cuda or cuda:N")
        _check(self.max_nonfinite >= 1, "train.max_nonfinite", self.max_nonfinite, ">= 1")
        _check(self.max_seconds >= 0, "train.max_seconds", self.max_seconds, ">= 0 (0: no time limit)")


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config value {key}={short(value)} is invalid: expected {expected}")


def validate(cfg: Any, prefix: str = "") -> None:
    """Validate a config and every nested section that has a ``validate`` method."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            validate(value, f"{prefix}{f.name}.")
    method = getattr(cfg, "validate", None)
    if method is not None:
        try:
            if prefix and "prefix" in inspect.signature(method).parameters:  # e.g. disc_optim: an OptimConfig
                method(prefix=prefix.rstrip("."))
            else:
                method()
        except ConfigError:
            raise
        except ValueError as e:  # model configs raise plain ValueError; add the section name
            raise ConfigError(f"config section {prefix.rstrip('.') or type(cfg).__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (after YAML parsing); convert int->float and list->tuple."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # X | None: the one arm's message is the precise one (e.g. names timesteps[1])
            raise ConfigError(errors[0])
        raise ConfigError(f"config key {key}: {short(value)} does not match {_type_name(tp)}")
    if origin is Literal:
        if value is False and "no" in get_args(tp):    # YAML 1.1 reads a bare `no` as false (train.compile=no)
            value = "no"
        if value not in get_args(tp):
            raise ConfigError(f"config key {key}: {short(value)} is not one of {list(get_args(tp))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key}: expected a list, got {short(value)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"config key {key}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            arm = args[0] if args else Any
            items = [_coerce(v, arm, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {key}: expected true/false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {key}: expected an integer, got {short(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {key}: expected a number, got {short(value)}")
        if not math.isfinite(value):   # inf / nan pass every `> 0` check below and train NaN weights
            raise ConfigError(f"config key {key}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key}: expected a string, got {short(value)}")
        return value
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key}: expected a mapping for section {tp.__name__}, got {short(value)}")
        return merge(tp(), value, prefix=f"{key}.")
    raise ConfigError(f"config key {key}: unsupported type {tp!r}")


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def merge(cfg: Any, updates: dict, prefix: str = "") -> Any:
    """Return a copy of dataclass ``cfg`` with ``updates`` (a nested dict) applied, type-checked key by key."""
    if not isinstance(updates, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'root'}: expected a mapping, got {short(updates)}")
    hints = get_type_hints(type(cfg))
    known = {f.name for f in fields(cfg)}
    changes = {}
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"unknown config key {short(key)}; known keys here: {sorted(known)}")
        current = getattr(cfg, name)
        if is_dataclass(current) and isinstance(value, dict):
            changes[name] = merge(current, value, prefix=f"{key}.")
        else:
            changes[name] = _coerce(value, hints[name], key)
    return dataclasses.replace(cfg, **changes)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.steps=10", "loss.kind=energy"]`` -> nested dict; values are parsed as YAML scalars."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {short(item)} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {short(item)} has an empty key")
        try:
            value = bounded_yaml(yaml.safe_load(raw), f"override {short(key)}") if raw.strip() != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {short(item)}: cannot parse value: {e}") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {short(item)} conflicts with another override of {short(part)}")
        node[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = bounded_yaml(yaml.safe_load(path.read_text(encoding="utf-8")), f"config file {path}")
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML: {clip(str(e), 600)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def resolve(base: Any, yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Preset -> YAML file -> dotted overrides, then validation."""
    cfg = base
    if yaml_path is not None:
        data = load_yaml(yaml_path)
        data.pop("command", None)
        try:
            cfg = merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{yaml_path}: {e}") from None
    if overrides:
        cfg = merge(cfg, parse_overrides(overrides))
    validate(cfg)
    return cfg


def dump_yaml(cfg: Any, path: str | Path, command: str | None = None) -> None:
    data = to_dict(cfg)
    if command is not None:
        data = {"command": command, **data}
    text = yaml.safe_dump(json.loads(json.dumps(data)), sort_keys=False)
    from e2ediff.checkpoint import atomic_write_text

    atomic_write_text(Path(path), text)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a config dataclass from ``to_dict`` output (a checkpoint's JSON)."""
    data = {k: v for k, v in data.items() if k != "command"}
    return merge(cls(), data)


def field_default(factory):
    return field(default_factory=factory)
