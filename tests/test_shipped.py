"""The shipped checkpoints (checkpoints/): sizes, checksums, kinds, presets, one shared autoencoder per preset; and
`e2ediff convert`, which made their float16 files."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from e2ediff.assets import load_autoencoder, load_pipeline, with_autoencoder
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
        assert meta["autoencoder_file"]["file"] == "autoencoder.safetensors"   # one autoencoder file, shared
        assert not any(k.startswith("autoencoder/") for k in tensors)
        tensors = with_autoencoder(path, tensors, meta)
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
    # the student's four-step sampler (timesteps, LCM boundary); w and renoise_gamma are the file's own dials, chosen
    # on validation (docs/results.md, round 15)
    assert replace(spec["e2e"], w=spec["lcm"].w, gamma=spec["lcm"].gamma) == spec["lcm"]
    assert (spec["e2e"].w, spec["e2e"].gamma) == (2.0, 0.7)


# the sampling dials (w, renoise_gamma) chosen on validation and stored in each file (docs/results.md, rounds 15-16)
SHIPPED_DIALS = {"e2e_2step": (1.75, 0.4), "e2e": (2.0, 0.7)}


@pytest.mark.parametrize("name,timesteps", [("e2e_1step", [999]), ("e2e_2step", [999, 499]),
                                            ("e2e", [999, 759, 499, 259])])
def test_shipped_base_per_k_models(name, timesteps):
    """The one-, two- and four-step E2E models sample at their own K by default and load through the shared
    autoencoder."""
    path = ROOT / "base" / f"{name}.safetensors"
    assert path.stat().st_size <= MAX_BYTES
    meta = read_model_meta(path)
    assert meta["kind"] == "e2e" and meta["sampler"]["timesteps"] == timesteps
    assert meta["run_config"]["sampler_steps"] == len(timesteps)
    if name in SHIPPED_DIALS:
        assert (meta["sampler"]["w"], meta["sampler"]["gamma"]) == SHIPPED_DIALS[name]
    pipe = load_pipeline(path)
    assert all(p.dtype == torch.float32 for p in pipe.autoencoder.parameters())


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


def test_convert_sets_the_sampling_dials(pipeline_files, tmp_path, capsys):
    """--w / --gamma change only the file's default sampler; `evaluate` and `sample` read it back."""
    src = pipeline_files["student"]
    out = tmp_path / "dialled.safetensors"
    assert main(["convert", str(src), str(out), "--w", "2.0", "--gamma", "0.6"]) == 0
    before, after = SamplerSpec.from_meta(read_model_meta(src)), SamplerSpec.from_meta(read_model_meta(out))
    assert (after.w, after.gamma) == (2.0, 0.6) and (before.w, before.gamma) != (2.0, 0.6)
    assert replace(after, w=before.w, gamma=before.gamma) == before
    assert all(torch.equal(v, all_tensors(src)[k].half()) for k, v in all_tensors(out).items() if v.is_floating_point())
    for flags, words in ((["--gamma", "1.5"], "--gamma must be in [0, 1], got 1.5"), (["--w", "0"], "--w must be > 0")):
        msg = run_error(capsys, "convert", src, tmp_path / "bad.safetensors", *flags)
        assert words in msg
        assert not (tmp_path / "bad.safetensors").exists()


def test_convert_refuses_its_input_and_missing_files(pipeline_files, tmp_path, capsys):
    src = pipeline_files["student"]
    msg = run_error(capsys, "convert", src, src, untouched=(src,))
    assert "is the input file" in msg and str(src) in msg
    msg = run_error(capsys, "convert", tmp_path / "missing.safetensors", tmp_path / "out.safetensors")
    assert "missing.safetensors" in msg and "does not exist" in msg
    assert not (tmp_path / "out.safetensors").exists()


def _share(src: Path, folder: Path, dtype: str = "float16") -> tuple[Path, Path]:
    """The tiny student's autoencoder as its own file in `folder`, and the student written against it."""
    from e2ediff.assets import autoencoder_meta, load_autoencoder
    from e2ediff.checkpoint import save_model_file, with_prefix

    ae = load_autoencoder(src)
    shared = folder / "autoencoder.safetensors"
    save_model_file(shared, with_prefix(ae.state_dict(), "autoencoder"), {"kind": "autoencoder", **autoencoder_meta(ae)},
                    dtype=getattr(torch, dtype))
    out = folder / "student.safetensors"
    assert main(["convert", str(src), str(out), "--dtype", dtype, "--share-autoencoder", str(shared)]) == 0
    return shared, out


def test_convert_shares_one_autoencoder_file(pipeline_files, tmp_path):
    """A pipeline written against a shared autoencoder file holds no autoencoder tensors and loads to exactly the
    modules of its self-contained twin; a copy elsewhere without the flag is self-contained again."""
    src = pipeline_files["student"]
    shared, out = _share(src, tmp_path)
    twin = tmp_path / "twin.safetensors"
    assert main(["convert", str(src), str(twin)]) == 0              # the same weights, autoencoder inside
    stored = all_tensors(out)
    assert stored and not any(k.startswith("autoencoder/") for k in stored)
    assert out.stat().st_size < twin.stat().st_size - 0.9 * shared.stat().st_size
    assert read_model_meta(out)["autoencoder_file"]["file"] == "autoencoder.safetensors"
    a, b = load_pipeline(out), load_pipeline(twin)
    for (n, x), (m, y) in zip(list(a.denoiser.state_dict().items()) + list(a.autoencoder.state_dict().items()),
                              list(b.denoiser.state_dict().items()) + list(b.autoencoder.state_dict().items())):
        assert n == m and torch.equal(x, y), n
    ae = load_autoencoder(out)                                        # the autoencoder alone, through the reference
    assert all(torch.equal(x, y) for x, y in zip(ae.state_dict().values(), b.autoencoder.state_dict().values()))
    (tmp_path / "copy").mkdir()
    copy = tmp_path / "copy" / "student.safetensors"
    assert main(["convert", str(out), str(copy)]) == 0               # materialised: loads without the shared file
    assert "autoencoder_file" not in read_model_meta(copy)
    assert any(k.startswith("autoencoder/") for k in all_tensors(copy))
    c = load_pipeline(copy)
    assert all(torch.equal(x, y) for x, y in zip(c.autoencoder.state_dict().values(), b.autoencoder.state_dict().values()))


def test_shared_autoencoder_errors_name_the_files(pipeline_files, tmp_path, capsys):
    from e2ediff.assets import autoencoder_meta, load_autoencoder
    from e2ediff.checkpoint import CheckpointError, save_model_file, with_prefix

    src = pipeline_files["student"]
    shared, out = _share(src, tmp_path)
    # another autoencoder in the shared file's place: refused by its checksum, naming both files
    ae = load_autoencoder(src)
    with torch.no_grad():
        next(ae.parameters()).add_(0.5)
    save_model_file(shared, with_prefix(ae.state_dict(), "autoencoder"), {"kind": "autoencoder", **autoencoder_meta(ae)},
                    dtype=torch.float16)
    with pytest.raises(CheckpointError, match="another autoencoder") as e:
        load_pipeline(out)
    assert str(out) in str(e.value) and str(shared) in str(e.value)
    # convert refuses to share an autoencoder the pipeline does not hold
    msg = run_error(capsys, "convert", src, tmp_path / "other.safetensors", "--share-autoencoder", shared)
    assert "is not the one in" in msg and str(shared) in msg
    assert not (tmp_path / "other.safetensors").exists()
    # the shared file gone: the error says which file and what to do
    shared.unlink()
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_pipeline(out)
    assert str(shared) in str(e.value)
    # the shared file must sit beside the output (the reference is a bare file name)
    (tmp_path / "elsewhere").mkdir()
    _, out2 = _share(src, tmp_path / "elsewhere")
    msg = run_error(capsys, "convert", src, tmp_path / "x.safetensors", "--share-autoencoder",
                    tmp_path / "elsewhere" / "autoencoder.safetensors")
    assert "--share-autoencoder" in msg and "folder of the output" in msg
    msg = run_error(capsys, "convert", src, tmp_path / "x.safetensors", "--share-autoencoder", tmp_path / "nope.st")
    assert "--share-autoencoder" in msg and "nope.st" in msg


def test_demo_labels_name_each_shipped_files_own_dials():
    """The demo's report names the dials each shipped E2E file samples with, read from the file (not written by hand)."""
    from e2ediff.demo import shipped_models

    labels = {path.name: name for name, path, _ in shipped_models()[1]}
    for name, (w, gamma) in SHIPPED_DIALS.items():
        label = labels[f"{name}.safetensors"]
        assert label.endswith(f"; w {w:g}, gamma {gamma:g} by default)"), label
