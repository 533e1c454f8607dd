"""The one guard every command passes before any work or any write (docs/reliability.md lists what it refuses).

``check_command(args)`` runs in ``cli.main`` right after argument parsing: bounded sizes, finite numbers, devices,
prompts, input files (regular files that exist), output paths (writable, not an input, not a special file).
``check_run(cfg, run_dir, config_file)`` adds what a training command reads from its config (``init=``, ``teacher=``,
…) and refuses inputs that the run would write over. The other helpers are the bounds used where files are read:
``bounded_yaml`` (alias expansion), ``check_model_meta`` (types of a model file's metadata), ``config_changes`` (what a
resumed run changes), ``short`` (values in error messages). Every refusal is a ``GuardError`` (a ValueError): the
command prints one ``error:`` line and exits with status 2.
"""
from __future__ import annotations

import math
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

MAX_SAMPLES = 200_000             # --num-samples (noise, latents and images stay under ~2 GB)
MAX_BATCH = 65_536                # --batch-size, train.batch_size
MAX_SAMPLER_STEPS = 1000          # --steps of a sampler, length of --timesteps
MAX_TRAIN_STEPS = 10**9
MAX_GRID_COLUMNS = 1000
MAX_PROMPTS = 100_000
MAX_PROMPT_CHARS = 1000
MAX_YAML_NODES = 100_000          # nodes of a config after YAML alias expansion
MAX_MESSAGE_VALUE = 120           # characters of a value quoted in an error message

# Keys a resumed run may change without --allow-changed: they do not change what is trained.
RESUMABLE_KEYS = ("train.steps", "train.progress", "train.log_every", "train.checkpoint_every", "train.keep_last",
                  "train.max_nonfinite", "train.device", "train.compile", "train.keep_exports",
                  "train.max_seconds")
# Config fields that name input files of a training run.
INPUT_KEYS = ("init", "teacher", "autoencoder", "lpips_weights", "lpips_heads", "prompt_cache")
# What a training run writes inside its --run-dir (files, then folders).
RUN_OUTPUT_FILES = ("model.safetensors", "config.yaml", "metrics.jsonl", "eval.json", "config_changes.jsonl", ".lock")
RUN_OUTPUT_DIRS = ("checkpoints", "tensorboard", "exports")

SAMPLER_KEYS = {"name": str, "steps": int, "guidance": float, "timesteps": list, "renoise": str, "w": float,
                "gamma": float, "timestep_scaling": float}


class GuardError(ValueError):
    """A refused input; the message names the flag, key or file."""


def short(value: Any, limit: int = MAX_MESSAGE_VALUE) -> str:
    """repr(value), cut to ``limit`` characters (a hostile value must not make a 300 MB error line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _fail(message: str) -> None:
    raise GuardError(message)


# ----------------------------------------------------------------------------------------------------------------------
# Numbers, devices, prompts


def check_int(flag: str, value: int | None, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        _fail(f"{flag} must be in [{lo}, {hi}], got {value}")


def check_finite(flag: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        _fail(f"{flag} must be a finite number, got {value}")


def check_device(flag: str, name: str) -> None:
    """auto | cpu | cuda | cuda:N; cuda only where a GPU is visible."""
    if name in ("auto", "cpu"):
        return
    if name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        _fail(f"{flag}={short(name)} is not a device: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        _fail(f"{flag}={name} but no CUDA device is available (use --device cpu or auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        _fail(f"{flag}={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")


def parse_timesteps(flag: str, text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if len(parts) > MAX_SAMPLER_STEPS:
        _fail(f"{flag} lists {len(parts)} timesteps; at most {MAX_SAMPLER_STEPS}")
    try:
        steps = tuple(int(t) for t in parts)
    except ValueError:
        _fail(f"{flag} {short(text)} is not a comma-separated list of integers")
    if any(b >= a for a, b in zip(steps, steps[1:])) or steps[-1] < 0 or steps[0] > 999:
        _fail(f"{flag} {short(text)} must be strictly descending integers in [0, 999]")
    return steps


def check_prompts(flag: str, prompts: list[str] | None) -> None:
    if not prompts:
        return
    if len(prompts) > MAX_PROMPTS:
        _fail(f"{flag} given {len(prompts)} times; at most {MAX_PROMPTS}")
    for p in prompts:
        if not p.strip():
            _fail(f"{flag} {short(p)} is empty")
        if len(p) > MAX_PROMPT_CHARS:
            _fail(f"{flag} {short(p)} is longer than {MAX_PROMPT_CHARS} characters")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            _fail(f"{flag} {short(p)} is not valid UTF-8")


# ----------------------------------------------------------------------------------------------------------------------
# Files


def _kind(path: Path) -> str:
    mode = os.stat(path).st_mode
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_input(flag: str, path: Path | None, must_exist: bool = True) -> None:
    """An input file: a regular file (FIFOs, devices and folders are refused: reading them can block or never end)."""
    if path is None:
        return
    path = Path(path)
    if not path.exists():
        if must_exist:
            _fail(f"{flag} {path} does not exist")
        return
    if not path.is_file():
        _fail(f"{flag} {path} is {_kind(path)}; expected a regular file")


def regular_file(path: Path, what: str = "file") -> Path:
    """For readers of data files: FileNotFoundError if absent, GuardError if it is not a regular file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not path.is_file():
        _fail(f"{what} {path} is {_kind(path)}; expected a regular file")
    return path


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.realpath(a) == os.path.realpath(b) or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _writable_ancestor(flag: str, path: Path, folder: bool = False) -> None:
    """The nearest existing folder at (``folder``) or above ``path`` must be a folder we can create files in (probed,
    then removed)."""
    ancestor = path if folder else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        _fail(f"{flag} {path}: {ancestor} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".e2ediff-write-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        _fail(f"{flag} {path}: cannot write in {ancestor} ({e.strerror or e})")


def check_output_file(flag: str, path: Path | None, inputs: dict[str, Path | None]) -> None:
    """A file a command will write: not a folder or special file, not one of ``inputs``, in a writable folder."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_file():
        _fail(f"{flag} {path} is {_kind(path)}; expected a file path")
    for name, source in inputs.items():
        if source is not None and _same(path, Path(source)):
            _fail(f"{flag} {path} is the input {name} {source}; refusing to write over an input (choose another path)")
    _writable_ancestor(flag, path)


def check_output_dir(flag: str, path: Path | None, files: Iterable[str], inputs: dict[str, Path | None]) -> None:
    """A folder a command will write ``files`` into."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        _fail(f"{flag} {path} is {_kind(path) if not path.is_file() else 'a file'}; expected a folder")
    for name in files:
        check_output_file(flag, path / name, inputs)
    _writable_ancestor(flag, path, folder=True)


# ----------------------------------------------------------------------------------------------------------------------
# The command guard


def _model_file(path: Path | None) -> Path | None:
    if path is None:
        return None
    return path / "model.safetensors" if path.is_dir() else path


def check_command(args) -> None:
    """Every flag of every command, before any work or write."""
    cmd = args.command

    def get(name: str):
        return getattr(args, name, None)

    sampling = cmd in ("sample", "evaluate")
    check_int("--num-samples", get("num_samples"), 10 if cmd == "demo" else 1, MAX_SAMPLES)
    check_int("--batch-size", get("batch_size"), 1, MAX_BATCH)
    check_int("--grid-columns", get("grid_columns"), 1, MAX_GRID_COLUMNS)
    check_int("--steps", get("steps"), 1, MAX_SAMPLER_STEPS if sampling else MAX_TRAIN_STEPS)
    check_int("--finetune-steps", get("finetune_steps"), 1, MAX_TRAIN_STEPS)
    check_int("--seed", get("seed"), 0, 2**63 - 1)
    for flag in ("guidance", "w", "lr"):
        check_finite(f"--{flag}", get(flag))
    if get("gamma") is not None and not 0.0 <= get("gamma") <= 1.0:   # sample / evaluate, and convert's file default
        _fail(f"--gamma must be in [0, 1], got {get('gamma')}")
    if get("lr") is not None and get("lr") <= 0:
        _fail(f"--lr must be > 0, got {get('lr')}")
    if get("timesteps"):
        args.timesteps = ",".join(str(t) for t in parse_timesteps("--timesteps", args.timesteps))
    if get("device") is not None:
        check_device("--device", args.device)
    check_prompts("--prompt", get("prompt"))

    inputs: dict[str, Path | None] = {}
    if cmd == "encode-prompts":
        check_input("--captions", get("captions"))
        inputs["--captions"] = get("captions")
        check_output_file("--output", get("output"), inputs)
    elif sampling:
        check_input("--prompt-cache", get("prompt_cache"))   # a cache named on the command line is never created
        inputs["--prompt-cache"] = get("prompt_cache")
        if get("checkpoint") is not None:
            check_input("--checkpoint", _model_file(args.checkpoint))
            inputs["--checkpoint"] = _model_file(args.checkpoint)
        if get("samples") is not None:
            check_input("--samples", args.samples)
            inputs["--samples"] = args.samples
        if cmd == "evaluate":
            if get("fp8") and get("samples") is not None:
                _fail("--fp8: only with --checkpoint (it quantizes the network that samples; --samples are drawn)")
            for name in ("model.safetensors", "config.json"):
                check_input("--classifier", args.classifier / name, must_exist=False)
            inputs["--classifier"] = args.classifier / "model.safetensors"
            check_output_file("--output", get("output"), inputs)
            check_output_dir("--save-samples", get("save_samples"), ("samples.npz", "grid.png"), inputs)
        else:
            check_output_dir("--output", args.output, ("samples.npz", "grid.png"), inputs)
            speed = [flag for flag, on in (("--dtype", get("dtype") is not None), ("--compile", get("compile")),
                                           ("--fuse-qkv", get("fuse_qkv")), ("--fp8", get("fp8")),
                                           ("--attention", get("attention") not in (None, "default"))) if on]
            if speed and get("pretrained") is None:
                _fail(f"{', '.join(speed)}: only for --pretrained pipelines (a --checkpoint model file samples in "
                      "float32, eagerly)")
    elif cmd == "convert":
        source = _model_file(args.input)
        check_input("input", source)
        if get("share_autoencoder") is not None:
            check_input("--share-autoencoder", args.share_autoencoder)
        check_output_file("output", args.output, {"file": source, "--share-autoencoder": get("share_autoencoder")})
    elif cmd == "train-classifier":
        check_output_dir("--output", args.output, ("model.safetensors", "config.json", "eval.json"), inputs)
    elif cmd == "train-lpips":
        check_output_file("--output", args.output, inputs)
    elif cmd == "demo":
        check_output_dir("--output", args.output, (), inputs)
    else:  # training commands
        check_input("--config", get("config"), must_exist=False)   # absent: load_yaml says so
        if args.run_dir.exists() and not args.run_dir.is_dir():
            _fail(f"--run-dir {args.run_dir} is {_kind(args.run_dir) if not args.run_dir.is_file() else 'a file'}; "
                  "expected a folder")
        _writable_ancestor("--run-dir", args.run_dir, folder=True)


def _inside(path: Path, root: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(root))
        return True
    except ValueError:
        return False


def check_run(cfg_dict: dict, run_dir: Path, config_file: Path | None = None) -> None:
    """The input files a training config names: regular files, and none that this run writes (``init=`` being the
    run's own ``model.safetensors`` would be replaced by the first export)."""
    run_dir = Path(run_dir)
    found: list[tuple[str, str]] = []

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif k in INPUT_KEYS and isinstance(v, str) and v:
                found.append((f"{prefix}{k}", v))

    walk(cfg_dict, "")
    if config_file is not None:
        found.append(("--config", str(config_file)))
    written = [run_dir / f for f in RUN_OUTPUT_FILES]
    for key, value in found:
        path = Path(value)
        flag = key if key.startswith("--") else f"{key}="
        pipeline_folder = key == "init" and path.is_dir() and (path / "model_index.json").is_file()  # diffusers
        if path.exists() and not path.is_file() and not pipeline_folder:
            _fail(f"{flag}{'' if flag.endswith('=') else ' '}{path} is {_kind(path)}; expected a regular file")
        if any(_same(path, w) for w in written) or any(_inside(path, run_dir / d) for d in RUN_OUTPUT_DIRS):
            _fail(f"{flag}{'' if flag.endswith('=') else ' '}{path} lies in --run-dir {run_dir} where the run writes "
                  "its own files and would be overwritten; copy it out of the run folder first")


# ----------------------------------------------------------------------------------------------------------------------
# Hostile files


def bounded_yaml(data: Any, where: str, limit: int = MAX_YAML_NODES) -> Any:
    """``data`` as yaml.safe_load returned it, if expanding its aliases gives at most ``limit`` nodes."""
    count = 0
    stack = [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            _fail(f"{where}: more than {limit} values after expanding YAML aliases; refusing (alias bomb?)")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return data


def check_model_meta(meta: Any) -> None:
    """Types of a model file's metadata (what sampling and loading read); GuardError naming the key."""
    if not isinstance(meta, dict):
        _fail(f"metadata must be a JSON object, got {type(meta).__name__}")
    expect = {"kind": str, "net": dict, "autoencoder": dict, "run_config": dict, "schedule": str, "prediction": str,
              "text_encoder": str, "sampler": dict, "captions": list, "scaling_factor": float, "step": int}
    for key, tp in expect.items():
        if key in meta and meta[key] is not None and not _is(meta[key], tp):
            _fail(f"metadata key {key!r} must be {tp.__name__}, got {short(meta[key])}")
    if "kind" not in meta:
        _fail("metadata key 'kind' is missing")
    if "captions" in meta and not all(isinstance(c, str) for c in meta["captions"]):
        _fail("metadata key 'captions' must be a list of strings")
    if meta.get("scaling_factor") is not None and not math.isfinite(meta["scaling_factor"]):
        _fail(f"metadata key 'scaling_factor' must be finite, got {meta['scaling_factor']}")
    sampler = meta.get("sampler")
    if sampler is None:
        return
    extra = sorted(set(sampler) - set(SAMPLER_KEYS))
    if extra:
        _fail(f"metadata key 'sampler' has unknown keys {short(extra)} (known: {sorted(SAMPLER_KEYS)})")
    for key, tp in SAMPLER_KEYS.items():
        value = sampler.get(key)
        if value is None:
            continue
        if not _is(value, tp) or (tp is float and not math.isfinite(value)):
            _fail(f"metadata key 'sampler.{key}' must be {'a finite number' if tp is float else tp.__name__}, "
                  f"got {short(value)}")
    if sampler.get("name") not in (None, "ddim", "lcm"):
        _fail(f"metadata key 'sampler.name' must be ddim or lcm, got {short(sampler['name'])}")
    if sampler.get("gamma") is not None and not 0.0 <= sampler["gamma"] <= 1.0:
        _fail(f"metadata key 'sampler.gamma' must be in [0, 1], got {sampler['gamma']}")
    if sampler.get("renoise") not in (None, "vp", "ve"):
        _fail(f"metadata key 'sampler.renoise' must be vp or ve, got {short(sampler['renoise'])}")
    if sampler.get("timesteps") is not None and not all(_is(t, int) for t in sampler["timesteps"]):
        _fail(f"metadata key 'sampler.timesteps' must be a list of integers, got {short(sampler['timesteps'])}")
    if sampler.get("steps") is not None and not 1 <= sampler["steps"] <= MAX_SAMPLER_STEPS:
        _fail(f"metadata key 'sampler.steps' must be in [1, {MAX_SAMPLER_STEPS}], got {sampler['steps']}")
    if sampler.get("timestep_scaling") is not None and sampler["timestep_scaling"] <= 0:
        _fail(f"metadata key 'sampler.timestep_scaling' must be > 0, got {sampler['timestep_scaling']}")


def _is(value: Any, tp: type) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


# ----------------------------------------------------------------------------------------------------------------------
# Resume


def flatten(node: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict, defaults: dict | None = None) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (checkpoint's value, current value)} for every key that differs, except RESUMABLE_KEYS.
    ``defaults`` (the config class's defaults): a key the checkpoint lacks — a setting added after the run started —
    is no change when its current value is that default, the behaviour the run had before the setting existed."""
    old, new, base = flatten(saved), flatten(current), flatten(defaults or {})
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k not in RESUMABLE_KEYS and f"train.{k}" not in RESUMABLE_KEYS
            and not (k not in old and k in base and new.get(k) == base[k])}


def describe_changes(changes: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    parts = [f"{k}: {short(a, 40)} -> {short(b, 40)}" for k, (a, b) in list(changes.items())[:limit]]
    more = len(changes) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def clip(message: str, limit: int = 2000) -> str:
    """An error line of at most ``limit`` characters."""
    return message if len(message) <= limit else f"{message[:limit]}… ({len(message)} characters)"
