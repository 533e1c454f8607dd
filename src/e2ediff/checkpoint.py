"""Checkpoints: safetensors tensors + a JSON state, written atomically, verified by checksum on load.

Layout of a run folder::

    run/config.yaml                     the resolved config
    run/checkpoints/step_00000100/      one complete checkpoint
        tensors.safetensors             every tensor: model/..., ema/..., optim/<name>/..., rng/torch
        state.json                      step, config, optimizer hyper-parameters, python/numpy RNG, sha256 of tensors
    run/checkpoints/latest              name of the newest complete checkpoint (updated last)

A checkpoint folder is written under a temporary name, every file fsynced, then renamed; ``latest`` is replaced
atomically after that, and only then are old checkpoints beyond ``keep_last`` deleted. A checkpoint whose checksum
does not match is reported with its path and resume falls back to the newest good one.

Single-file model exports (``save_model_file``) hold weights in safetensors with the model kind and config as
JSON in the safetensors metadata: what we ship and what ``e2ediff sample`` loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, safe_open, save, save_file

from e2ediff.guards import GuardError, check_model_meta

FORMAT_VERSION = 2   # 2: state.json carries state_sha256, the sha256 of its own other fields

# Fields of state.json every checkpoint holds, and those the training loop reads, with their JSON types.
STATE_FIELDS = {"step": int, "tensors_sha256": str, "state_sha256": str}
TRAINING_FIELDS = {**STATE_FIELDS, "kind": str, "config": dict, "optim": dict, "sched": dict, "rng": dict}


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupted or of another model; the message names the path."""


# ----------------------------------------------------------------------------------------------------------------------
# Atomic file writes


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:   # a full disk or a file-size limit: name the file the user asked for
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_npz(path: Path, compressed: bool = False, **arrays) -> None:
    """np.savez(_compressed) of ``arrays`` into ``path`` atomically (no pickled objects)."""
    import io

    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    atomic_write_bytes(Path(path), buf.getvalue())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Optimizer and RNG state as tensors + JSON


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    return optimizer_state_tensors(opt.state_dict(), prefix)


def optimizer_state_tensors(sd: dict, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict (``{"state": {index: {...}}, "param_groups": [...]}``) as tensors + JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}/state/{idx}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    opt.load_state_dict(saved_optimizer_state(prefix, tensors, meta))


def saved_optimizer_state(prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimizer state dict that ``optimizer_state_tensors`` wrote as tensors + JSON."""
    state: dict[int, dict] = {}
    head = f"{prefix}/state/"
    for key, v in tensors.items():
        if key.startswith(head):
            idx, k = key[len(head):].split("/", 1)
            state.setdefault(int(idx), {})[k] = v
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    np_state = np.random.get_state()
    meta = {"python": _jsonable(random.getstate()),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def load_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng/cuda/"))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(_tuplify(meta["python"]))
    a, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((a, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# ----------------------------------------------------------------------------------------------------------------------
# Training checkpoints


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
                    keep_last: int = 3) -> Path:
    """Write ``step_XXXXXXXX/`` atomically, then point ``latest`` at it, then prune old checkpoints."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    final = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        blob = save(tensors, metadata={"format": "e2ediff-checkpoint", "version": str(FORMAT_VERSION)})
        with open(tmp / "tensors.safetensors", "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        state = {**state, "format_version": FORMAT_VERSION, "step": step,
                 "tensors_sha256": hashlib.sha256(blob).hexdigest(), "tensors_bytes": len(blob)}
        state["state_sha256"] = state_sha256(state)
        with open(tmp / "state.json", "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
    except BaseException as e:  # nothing half-written may stay behind (e.g. tensors that share memory, a full disk)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror, str(final)) from None
        raise
    if final.exists():  # re-saving the same step (e.g. a resumed run that stops at once)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, required: dict[str, type] = STATE_FIELDS) -> tuple[dict[str, torch.Tensor], dict]:
    """Load and verify one checkpoint folder; raise CheckpointError naming the path if it is bad."""
    path = Path(path)
    tensors_path, state_path = path / "tensors.safetensors", path / "state.json"
    if not state_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: expected tensors.safetensors and state.json")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {state_path} is corrupt: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {state_path} is corrupt: expected a JSON object")
    for name, tp in required.items():
        if not isinstance(state.get(name), tp) or isinstance(state.get(name), bool):
            raise CheckpointError(f"checkpoint {state_path} is incomplete: field {name!r} is missing or not "
                                  f"{tp.__name__}")
    if state_sha256(state) != state["state_sha256"]:
        raise CheckpointError(f"checkpoint {state_path} was edited or is corrupt: its sha256 does not match "
                              f"state_sha256")
    expected = state.get("tensors_sha256")
    if expected is None or sha256_file(tensors_path) != expected:
        raise CheckpointError(f"checkpoint {tensors_path} is corrupt or truncated: sha256 does not match state.json")
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {tensors_path} cannot be read: {e}") from None
    return tensors, state


def state_sha256(state: dict) -> str:
    """sha256 of a checkpoint's state.json fields (canonical JSON, sorted keys) other than ``state_sha256`` and
    ``tensors_sha256`` (the tensors file's own check; it varies with safetensors' header order, see the docs)."""
    rest = {k: v for k, v in state.items() if k not in ("state_sha256", "tensors_sha256")}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def latest_checkpoint(run_dir: Path, required: dict[str, type] = STATE_FIELDS
                      ) -> tuple[Path, dict[str, torch.Tensor], dict] | None:
    """The newest checkpoint of a run that verifies and holds the ``required`` state fields, or None. A bad one is
    reported and skipped."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named in candidates:  # try the pointer first, then everything older or newer by step
            candidates.remove(named)
            candidates.insert(0, named)
    for path in candidates:
        try:
            tensors, state = load_checkpoint(path, required)
        except CheckpointError as e:
            warnings.warn(f"{e}; falling back to an earlier checkpoint", stacklevel=2)
            continue
        return path, tensors, state
    return None


def split_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    head = prefix.rstrip("/") + "/"
    return {k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}


def with_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{k}": v for k, v in state_dict.items()}


def load_state_strict(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a message that names the file and the mismatching keys/shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    extra = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
    # Weights that would load silently but compute garbage: NaN/inf values, integers or bools where floats belong.
    for k, v in state_dict.items():
        if k in own and own[k].is_floating_point():
            if not v.is_floating_point():
                raise CheckpointError(f"{source}: tensor {k!r} is {str(v.dtype).replace('torch.', '')}, "
                                      f"expected a floating-point tensor")
            if not bool(torch.isfinite(v).all()):
                raise CheckpointError(f"{source}: tensor {k!r} holds {int((~torch.isfinite(v)).sum())} "
                                      f"non-finite values (NaN/inf)")
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}{' …' if len(missing) > 4 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:4]}{' …' if len(extra) > 4 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{' …' if len(shapes) > 3 else ''}")
        raise CheckpointError(f"{source} does not fit this model ({type(module).__name__}): " + "; ".join(parts))
    module.load_state_dict(state_dict)


# ----------------------------------------------------------------------------------------------------------------------
# Single-file model exports


def _data_sha256(blob: bytes) -> str:
    """sha256 of a safetensors blob's tensor data (after the 8-byte length and the JSON header): it does not depend
    on the metadata, so it can be stored in the metadata."""
    n = int.from_bytes(blob[:8], "little")
    return hashlib.sha256(memoryview(blob)[8 + n:]).hexdigest()


def save_model_file(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                    dtype: torch.dtype | None = None) -> None:
    """One safetensors file: weights (optionally cast) + ``meta`` as JSON under the metadata key ``e2ediff`` and the
    sha256 of the tensor data under ``e2ediff_sha256`` (checked on load)."""
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
               for k, v in state_dict.items()}
    metadata = {"e2ediff": json.dumps(meta)}
    checksum = _data_sha256(save(tensors, metadata=metadata))
    blob = save(tensors, metadata={**metadata, "e2ediff_sha256": checksum})
    atomic_write_bytes(Path(path), blob)


def _read_metadata(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise CheckpointError(f"model file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"model file {path} is not a readable safetensors file: {e}") from None
    if "e2ediff" not in meta:
        raise CheckpointError(f"model file {path} has no e2ediff metadata (not written by e2ediff export)")
    return meta


def read_model_meta(path: Path) -> dict:
    path = Path(path)
    meta = _read_metadata(path)
    try:
        parsed = json.loads(meta["e2ediff"])
        check_model_meta(parsed)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"model file {path} has corrupt e2ediff metadata: {e}") from None
    except GuardError as e:
        raise CheckpointError(f"model file {path} has malformed e2ediff metadata: {e}") from None
    return parsed


def read_data_checksum(path: Path) -> str:
    """The sha256 of a model file's tensor data as stored in its metadata (``load_model_file`` verifies it)."""
    return _read_metadata(Path(path)).get("e2ediff_sha256", "")


def load_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(float32 tensors, metadata) of a ``save_model_file`` file; CheckpointError naming the path if it is missing,
    not ours, truncated or its tensor data does not match the stored checksum."""
    path = Path(path)
    raw = _read_metadata(path)
    meta = read_model_meta(path)
    try:
        blob = path.read_bytes()
        if "e2ediff_sha256" not in raw:
            raise CheckpointError(f"model file {path} has no e2ediff_sha256 checksum in its metadata; refusing to load "
                                  f"unverified weights")
        if _data_sha256(blob) != raw["e2ediff_sha256"]:
            raise CheckpointError(f"model file {path} is corrupt or truncated: its tensor data does not match the "
                                  f"stored sha256")
        tensors = load(blob)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"model file {path} cannot be read: {e}") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, meta


def save_file_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    atomic_write_bytes(Path(path), save({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                                        metadata=metadata))


__all__ = [
    "CheckpointError", "atomic_write_bytes", "atomic_write_text", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "optimizer_state", "load_optimizer_state", "rng_state", "load_rng_state",
    "split_prefix", "with_prefix", "load_state_strict", "save_model_file", "load_model_file", "read_model_meta",
    "save_file_atomic", "sha256_file", "save_file",
]
