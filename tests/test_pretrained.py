"""`e2ediff finetune --pretrained` / `sample --pretrained` on tiny saved diffusers pipeline folders.

References: diffusers itself — `DiffusionPipeline.from_pretrained` of the exported folder, `load_lora_weights` of the
exported LoRA on the base pipeline, each sampled by the pipeline's own `__call__` with LCMScheduler on the same
seed; a straight run for the resumed one; one process with the doubled batch for two gloo processes.
"""
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

import tiny_diffusers as td
from e2ediff.checkpoint import load_checkpoint
from e2ediff.cli import main

PROMPTS = ["a red boot", "a blue shirt"]
COMMON = ["--resolution", "16", "train.device=cpu", "train.progress=false", "train.deterministic=true",
          "optim.lr=1e-2", "sampler_steps=2", "train.steps=2", "train.checkpoint_every=1", "train.keep_last=5",
          "train.batch_size=2", "loss.l2=1.0"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    td.pixart_pipeline().save_pretrained(root / "pixart")
    td.sd_pipeline().save_pretrained(root / "sd")
    td.write_imagefolder(root / "data")
    return root


def finetune_argv(folders, base, run_dir, *extra):
    options = [a for i, a in enumerate(extra) if a.startswith("--") or (i and extra[i - 1] == "--lora-rank")]
    overrides = [a for a in extra if a not in options]
    return ["finetune", "--pretrained", str(folders / base), "--train-data-dir", str(folders / "data"),
            "--run-dir", str(run_dir), *options, *COMMON, *overrides]


def finetune(folders, base, run_dir, *extra):
    assert main(finetune_argv(folders, base, run_dir, *extra)) == 0


FAST = ["--dtype", "bfloat16", "--fuse-qkv", "--compile", "--attention", "math"]   # every speed option of `sample`


def our_samples(source, out, steps=None, *options):
    argv = ["sample", "--pretrained", str(source), "--output", str(out), "--num-samples", str(len(PROMPTS)),
            "--seed", "3", "--device", "cpu", *options] + sum((["--prompt", p] for p in PROMPTS), [])
    if steps:
        argv += ["--steps", str(steps)]
    assert main(argv) == 0
    assert (out / "000.png").is_file()
    return load_file(str(out / "latents.safetensors"))["latents"]


def pipeline_samples(pipe, steps=2):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"clean_caption": False, "use_resolution_binning": False} if hasattr(pipe, "transformer") else {}
    return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=1.0, output_type="latent", height=16,
                width=16, generator=torch.Generator().manual_seed(3), **kwargs).images


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def checkpoint_tensors(run_dir, step):
    return load_checkpoint(run_dir / "checkpoints" / f"step_{step:08d}")[0]


def test_full_finetune_exports_a_pipeline_folder_diffusers_loads(folders, tmp_path):
    from diffusers import DiffusionPipeline, PixArtTransformer2DModel

    run = tmp_path / "run"
    finetune(folders, "pixart", run)
    tensors = checkpoint_tensors(run, 2)
    weights = [k for k in tensors if k.startswith("net/")]
    n_transformer = len(dict(PixArtTransformer2DModel.from_pretrained(folders / "pixart" / "transformer")
                             .named_parameters()))
    assert len(weights) == n_transformer                      # the transformer only: no VAE, no T5
    assert all(k.startswith("net/net.model.") for k in weights)
    meta = json.loads((run / "pipeline" / "e2ediff.json").read_text())
    assert meta["sampler"]["timesteps"] == [999, 499]
    pipe = DiffusionPipeline.from_pretrained(run / "pipeline")
    ref = pipeline_samples(pipe)
    ours = our_samples(run / "pipeline", tmp_path / "ours")
    assert rel(ours, ref) < 1e-5                               # our sampler = diffusers on the exported folder
    original = pipeline_samples(DiffusionPipeline.from_pretrained(folders / "pixart"))
    assert rel(ref, original) > 1e-3                           # and fine-tuning changed it


def test_sd_lora_exports_weights_load_lora_weights_reads(folders, tmp_path):
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    finetune(folders, "sd", run, "--lora-rank", "2")
    tensors = checkpoint_tensors(run, 2)
    weights = [k for k in tensors if k.startswith("net/")]
    assert weights and all("lora_" in k for k in weights)     # adapters only, never the frozen UNet
    assert any(k.startswith("ema/net/") for k in tensors)
    assert all("lora_" in k for k in tensors if k.startswith("ema/"))
    pipe = DiffusionPipeline.from_pretrained(folders / "sd")
    original = pipeline_samples(pipe)
    pipe.load_lora_weights(run / "lora")
    ref = pipeline_samples(pipe)
    ours = our_samples(run / "lora", tmp_path / "ours")
    assert rel(ours, ref) < 1e-5
    assert rel(ref, original) > 1e-3


def test_pixart_lora_and_its_merged_export_sample_alike(folders, tmp_path):
    from diffusers import DiffusionPipeline

    run = tmp_path / "run"
    finetune(folders, "pixart", run, "--lora-rank", "2", "--merge-lora")
    ours = our_samples(run / "lora", tmp_path / "ours")
    merged = pipeline_samples(DiffusionPipeline.from_pretrained(run / "pipeline_merged"))
    assert rel(ours, merged) < 1e-4
    original = pipeline_samples(DiffusionPipeline.from_pretrained(folders / "pixart"))
    assert rel(merged, original) > 1e-3
    fast = our_samples(run / "lora", tmp_path / "fast", None, "--dtype", "bfloat16", "--fuse-qkv")
    assert rel(fast, ours) < 2e-2 and rel(fast, ours) < rel(original, ours) / 5   # the adapters are still applied
    fp8 = our_samples(run / "lora", tmp_path / "fp8", None, "--fp8")    # merged first, else float8_linear refuses
    assert rel(fp8, ours) < 0.1


def test_sample_speed_options_give_the_plain_samples(folders, tmp_path, monkeypatch):
    """bf16 weights, fused q/k/v, a compiled transformer (traced by aot_eager here) and another attention kernel give
    the float32 eager samples within bf16 rounding, from the same noise."""
    from helpers import record_compile

    calls = record_compile(monkeypatch, "aot_eager")
    plain = our_samples(folders / "pixart", tmp_path / "plain")
    fast = our_samples(folders / "pixart", tmp_path / "fast", None, *FAST)
    assert len(calls) == 2                                # each of the tiny transformer's 2 blocks
    assert rel(fast, plain) < 2e-2
    assert rel(fast, our_samples(folders / "pixart", tmp_path / "seed4", None, "--seed", "4")) > 0.1


def test_sample_speed_options_need_a_pretrained_pipeline(tmp_path, capsys):
    from helpers import run_error

    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    for option in (["--compile"], ["--dtype", "bfloat16"], ["--fuse-qkv"], ["--attention", "cudnn"], ["--fp8"]):
        line = run_error(capsys, "sample", "--checkpoint", model, "--output", tmp_path / "o", "--device", "cpu",
                         *option)
        assert line.startswith(f"{option[0]}: only for --pretrained"), line


def test_lora_resume_is_exact(folders, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    finetune(folders, "pixart", straight, "--lora-rank", "2", "train.steps=3")
    finetune(folders, "pixart", resumed, "--lora-rank", "2", "train.steps=1")
    finetune(folders, "pixart", resumed, "--lora-rank", "2", "train.steps=3")
    a, b = checkpoint_tensors(straight, 3), checkpoint_tensors(resumed, 3)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    la = load_file(str(straight / "lora" / "transformer_lora.safetensors"))
    lb = load_file(str(resumed / "lora" / "transformer_lora.safetensors"))
    assert all(torch.equal(la[k], lb[k]) for k in la)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, world, port, argv, fsdp_env=None):
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)   # no state from an earlier run in this process
    if fsdp_env is None:
        assert main(argv) == 0
        return
    # `accelerate launch` turns an FSDP config's fsdp_config into these variables. accelerate 1.16 then switches to
    # FSDP only for GPU-like distributed types (MULTI_GPU, ...), so on CPU the test sets the state's distributed type
    # itself, with the plugin the variables describe; sharding, reduce-scatter and state dicts are torch's on gloo.
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from e2ediff import fsdp

    os.environ.update(fsdp_env)
    state = Accelerator(cpu=True).state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    PartialState().distributed_type = DistributedType.FSDP   # as AcceleratorState records its own choice there
    shards = []
    gather = fsdp.whole_model_state

    def observed(module, trainable_only):   # what each checkpoint gathers: the trainable parameters, split
        shards.append([(p.to_local().numel(), p.numel()) for p in module.parameters() if p.requires_grad])
        return gather(module, trainable_only)

    fsdp.whole_model_state = observed
    assert main(argv) == 0
    assert shards and all(local < whole for local, whole in shards[-1] if whole >= world), shards[-1][:4]


def test_two_gloo_processes_equal_one_process_with_the_doubled_batch(folders, tmp_path):
    """DDP (accelerator.prepare) over 2 CPU processes, 1 image each, = 1 process with both images; a run resumed on
    the other process count continues the same run."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--lora-rank", "2", "train.deterministic=false"]
    finetune(folders, "pixart", one, *extra)
    argv = finetune_argv(folders, "pixart", two, *extra)
    mp.start_processes(_rank, args=(2, _free_port(), argv), nprocs=2, join=True, start_method="spawn")
    a, b = checkpoint_tensors(one, 2), checkpoint_tensors(two, 2)
    assert load_checkpoint(two / "checkpoints" / "step_00000002")[1]["num_processes"] == 2
    for k in a:
        if k.startswith(("net/", "ema/")):
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # step 1 on two processes, step 2 resumed on one: the same run
    mixed = tmp_path / "mixed"
    mp.start_processes(_rank, args=(2, _free_port(), finetune_argv(folders, "pixart", mixed, *extra, "train.steps=1")),
                       nprocs=2, join=True, start_method="spawn")
    finetune(folders, "pixart", mixed, *extra)
    c = checkpoint_tensors(mixed, 2)
    for k in a:
        if k.startswith(("net/", "ema/")):
            torch.testing.assert_close(c[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_cached_latents_train_exactly_as_live_encoding(folders, tmp_path):
    live, cached = tmp_path / "live", tmp_path / "cached"
    finetune(folders, "pixart", live, "--lora-rank", "2", "train.steps=1")
    finetune(folders, "pixart", cached, "--lora-rank", "2", "train.steps=1", "pretrained.cache_latents=true")
    assert list((cached / "cache").glob("latents-*/000000.safetensors"))
    a, b = checkpoint_tensors(live, 1), checkpoint_tensors(cached, 1)
    for k in a:
        if k.startswith(("net/", "ema/")):
            torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7, msg=k)


def test_caption_cache_holds_the_pipelines_features_and_is_reused(folders, tmp_path):
    from e2ediff.adapters.pipeline import load_pretrained
    from e2ediff.data.imagefolder import caption_cache

    pp = load_pretrained(folders / "pixart")
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return pp.encode_prompts(captions)

    rows = torch.tensor([4, 0, 2])
    first = caption_cache(encode, td.CAPTIONS, pp.text_encoder_key(), tmp_path, batch_size=4)[rows]
    again = caption_cache(encode, td.CAPTIONS, pp.text_encoder_key(), tmp_path)[rows]
    assert len(calls) == 2 and torch.equal(first.tokens, again.tokens) and torch.equal(first.mask, again.mask)
    tokens, mask, _, _ = pp.pipe.encode_prompt(td.CAPTIONS, do_classifier_free_guidance=False, device="cpu",
                                               clean_caption=False, max_sequence_length=120)
    torch.testing.assert_close(again.tokens, tokens[rows], rtol=0, atol=0)
    assert torch.equal(again.mask, mask[rows].bool())
    caption_cache(encode, td.CAPTIONS, pp.text_encoder_key() + "another encoder", tmp_path)
    assert len(calls) == 3                                     # another encoder: another key, not a stale cache


def test_row_store_reads_rows_across_shards(tmp_path):
    from e2ediff.data.imagefolder import RowStore

    data = torch.randn(10, 3, 2)
    store = RowStore.write(tmp_path / "store", ({"x": data[s:s + 3]} for s in range(0, 10, 3)), shard_rows=4)
    assert len(store) == 10 and len(list((tmp_path / "store").glob("*.safetensors"))) == 3
    assert torch.equal(store.rows("x", [9, 0, 5, 4]), data[[9, 0, 5, 4]])
    with pytest.raises(IndexError):
        store.rows("x", [10])


def test_imagefolder_resizes_crops_and_names_bad_records(folders, tmp_path):
    from e2ediff.data.imagefolder import ImageFolderCaptions

    data = ImageFolderCaptions(folders / "data", resolution=16)
    images = data.images(torch.arange(len(data)))
    assert images.shape == (len(data), 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert data.captions[int(data.caption_index[1])] == td.CAPTIONS[1]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "a boot"}\n')
    with pytest.raises(FileNotFoundError, match="metadata.jsonl:1"):
        ImageFolderCaptions(tmp_path, resolution=16)


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_the_launchers_mixed_precision_is_honoured(folders, tmp_path, monkeypatch, fresh_accelerate_state):
    """`accelerate launch --mixed_precision bf16` sets ACCELERATE_MIXED_PRECISION; train.mixed_precision=auto uses it."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    run = tmp_path / "run"
    finetune(folders, "pixart", run, "--lora-rank", "2", "train.steps=1")
    state = load_checkpoint(run / "checkpoints" / "step_00000001")[1]
    assert state["mixed_precision"] == "bf16"
    assert state["config"]["train"]["mixed_precision"] == "auto"


# What `accelerate launch` sets for an FSDP config with fsdp_version: 2, auto wrap per transformer block (README).
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock", "FSDP_RESHARD_AFTER_FORWARD": "true"}


def fsdp_finetune(folders, base, run_dir, *extra):
    argv = finetune_argv(folders, base, run_dir, *extra)
    mp.start_processes(_rank, args=(2, _free_port(), argv, FSDP_ENV), nprocs=2, join=True, start_method="spawn")


def assert_same_run(got, want, prefixes=("net/", "ema/", "optim/")):
    assert got.keys() == want.keys()
    for k in want:
        if k.startswith(prefixes):
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def assert_same_file(got: Path, want: Path):
    """Two safetensors exports hold the same keys and, within the run tolerance, the same tensors."""
    assert_same_run(load_file(str(got)), load_file(str(want)), prefixes="")


def test_fsdp_full_finetune_on_two_gloo_processes_equals_one_process(folders, tmp_path):
    """FSDP2 over 2 CPU processes, 1 image each, = 1 process with both images: weights, EMA and AdamW moments in the
    checkpoint (whole tensors, the one-process file layout) and the exported pipeline; a run checkpointed under FSDP
    and resumed in one process (no FSDP) continues the same run."""
    one, two, mixed = tmp_path / "one", tmp_path / "two", tmp_path / "mixed"
    # The key biases' gradient is zero up to rounding (softmax ignores a shift shared by all keys), and Adam with the
    # default eps turns that rounding noise into full-size steps of either sign: eps 1e-3 keeps such steps small.
    extra = ["train.deterministic=false", "optim.eps=1e-3"]
    finetune(folders, "pixart", one, *extra)
    fsdp_finetune(folders, "pixart", two, *extra)
    a = checkpoint_tensors(one, 2)
    assert_same_run(checkpoint_tensors(two, 2), a)
    assert load_checkpoint(two / "checkpoints" / "step_00000002")[1]["num_processes"] == 2
    weights = Path("pipeline") / "transformer" / "diffusion_pytorch_model.safetensors"
    assert_same_file(two / weights, one / weights)
    fsdp_finetune(folders, "pixart", mixed, *extra, "train.steps=1")
    finetune(folders, "pixart", mixed, *extra)
    assert_same_run(checkpoint_tensors(mixed, 2), a)


def test_fsdp_lora_on_two_gloo_processes_equals_one_process(folders, tmp_path):
    """The same for SD LoRA: checkpoints and EMA hold the adapters only, never the frozen UNet; a one-process
    checkpoint resumed under FSDP (into the sharded model and optimizer) continues the same run."""
    one, two, mixed = tmp_path / "one", tmp_path / "two", tmp_path / "mixed"
    extra = ["--lora-rank", "2", "train.deterministic=false"]
    finetune(folders, "sd", one, *extra)
    fsdp_finetune(folders, "sd", two, *extra)
    a, b = checkpoint_tensors(one, 2), checkpoint_tensors(two, 2)
    assert all("lora_" in k for k in b if k.startswith(("net/", "ema/")))
    assert_same_run(b, a)
    lora = Path("lora") / "pytorch_lora_weights.safetensors"
    assert_same_file(two / lora, one / lora)
    finetune(folders, "sd", mixed, *extra, "train.steps=1")
    fsdp_finetune(folders, "sd", mixed, *extra)
    assert_same_run(checkpoint_tensors(mixed, 2), a)


@pytest.mark.parametrize("override, field", [
    ("loss.anchor=10", "loss.anchor"), ("loss.real_bank=4", "loss.real_bank"),
    ("disc_warmup=5", "disc_warmup"), ("sampler_steps_mix=[1,2]", "sampler_steps_mix"),
    ("w_range=[1.0,2.0]", "w_range"), ("loss.gan_group_std=true", "loss.gan_group_std"),
    ("renoise_gamma=0", "renoise_gamma"),
])
def test_miniature_only_switches_are_refused_with_pretrained_not_ignored(override, field):
    from e2ediff.config import ConfigError, resolve
    from e2ediff.pretrained import PRESETS

    extra = ["loss.gan=0.1"] if field in ("disc_warmup", "loss.gan_group_std") else []
    extra += ["loss.energy=1.0", "samples_per_caption=2"] if field in ("loss.real_bank", "loss.gan_group_std") else []
    with pytest.raises(ConfigError, match=field.replace(".", r"\.") + r".*--pretrained"):
        resolve(PRESETS["tiny"], overrides=["init=x", "pretrained.train_data_dir=d", *extra, override])
    resolve(PRESETS["tiny"], overrides=["init=x", "pretrained.train_data_dir=d", *extra])   # fine without it
