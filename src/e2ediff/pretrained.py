"""E2E fine-tuning (Algorithm 1) of a diffusers pipeline: PixArt-α/δ, SD 1.x/2.x, SDXL; full or LoRA.

`e2ediff finetune --pretrained PATH_OR_HUB_ID --train-data-dir FOLDER ...` binds the same `e2e_step` and
`E2EObjective` as the miniature to the adapters (e2ediff.adapters) and the imagefolder data (e2ediff.data.imagefolder).
What differs from the miniature:
- the schedule, prediction type, LCM timesteps and timestep_scaling come from the pipeline's scheduler config;
- checkpoints and the EMA hold the trainable tensors only (LoRA: the adapters; full: the transformer / UNet), never
  the frozen VAE and text encoders;
- outputs a user loads without us, written at every checkpoint into the run folder:
    full:        pipeline/         a complete pipeline folder (`DiffusionPipeline.from_pretrained`)
    LoRA, SD:    lora/             pytorch_lora_weights.safetensors (`pipe.load_lora_weights`)
    LoRA, PixArt: lora/            the peft state dict + lora_config.json (diffusers has no PixArt LoRA loader)
    --merge-lora: pipeline_merged/ the adapters folded into the base, a complete pipeline folder
  each with e2ediff.json (the base, the sampler the run trained), read by `e2ediff sample --pretrained`.
- several processes: the whole unrolled step is one forward call of a DDP-wrapped module (`Part.ddp`), so the K
  network calls and their recomputation in backward stay inside one DDP iteration; under an FSDP accelerate config
  the same module is sharded by FSDP2 (e2ediff.fsdp), and process 0 exports from a whole CPU copy of the trained
  network made before sharding (`before_sharding`), into which the gathered EMA weights are swapped.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from e2ediff.config import OptimConfig, TrainConfig, _check
from e2ediff.denoiser import Denoiser
from e2ediff.e2e import E2ELoss, E2EObjective, FinetuneRun, e2e_step
from e2ediff.trainer import BatchStream, Part, Task


@dataclass
class PretrainedConfig:
    train_data_dir: str = ""             # imagefolder: metadata.jsonl (file_name, text) + images
    caption_column: str = "text"
    resolution: int = 512                # images are resized (shorter side) and centre-cropped to this
    center_crop: bool = True
    random_flip: bool = False
    cache_latents: bool = False          # encode every image once with the VAE and keep the latents on disk
    cache_dir: str = ""                  # caption / latent caches (default: <run-dir>/cache)
    lora_rank: int = 0                   # 0: full fine-tuning; > 0: peft LoRA of this rank
    lora_alpha: float = 0.0              # 0: = lora_rank
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    merge_lora: bool = False             # also export the adapters folded into the base (pipeline_merged/)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"   # weights of the frozen VAE / text encoders
    compile: bool = False                # torch.compile the transformer (each PixArt block) / UNet (adapters.speed)
    max_sequence_length: int = 120       # T5 tokens (PixArt)

    def validate(self) -> None:
        _check(bool(self.train_data_dir), "pretrained.train_data_dir", self.train_data_dir,
               "an imagefolder (--train-data-dir)")
        _check(self.resolution >= 8, "pretrained.resolution", self.resolution, ">= 8")
        _check(self.lora_rank >= 0, "pretrained.lora_rank", self.lora_rank, ">= 0")
        _check(not self.merge_lora or self.lora_rank > 0, "pretrained.merge_lora", self.merge_lora,
               "false unless lora_rank > 0")


@dataclass
class PretrainedFinetuneRun(FinetuneRun):
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)

    def validate(self) -> None:
        super().validate()
        # the miniature's recipe switches that this task does not implement yet: refused by name, never ignored
        for name, value, unset in (("loss.anchor", self.loss.anchor, 0.0), ("loss.real_bank", self.loss.real_bank, 0),
                                   ("loss.gan_group_std", self.loss.gan_group_std, False),
                                   ("disc_warmup", self.disc_warmup, 0),
                                   ("sampler_steps_mix", self.sampler_steps_mix, None),
                                   ("w_range", self.w_range, None),
                                   ("renoise_gamma", self.renoise_gamma, None)):
            _check(value == unset, name, value, f"{unset} with --pretrained (a diffusers pipeline): only the "
                   "miniature's finetune implements it so far")


def _paper(**train) -> PretrainedFinetuneRun:
    """The paper's setting: AdamW lr 1e-6, weight decay 1e-8, EMA 0.95, L2 + LPIPS, one sample per image, K = 4."""
    return PretrainedFinetuneRun(samples_per_caption=1, loss=E2ELoss(energy=0.0, l2=1.0),
                                 optim=OptimConfig(lr=1e-6, weight_decay=1e-8),
                                 train=TrainConfig(ema_decay=0.95, **train))


PRESETS = {
    "tiny": _paper(steps=2, batch_size=2, checkpoint_every=1),
    "base": _paper(steps=1000, batch_size=8, checkpoint_every=250),
    "paper": _paper(steps=24000, batch_size=8, checkpoint_every=1000),
}


class E2EUnroll(nn.Module):
    """One E2E forward (Algorithm 1: pure noise → K differentiable LCM steps → ẑ0) as a module call, so DDP sees one
    forward per backward. The autoencoder is held outside the module tree (frozen, not synchronised)."""

    def __init__(self, net: nn.Module, autoencoder: nn.Module, schedule, prediction: str, timesteps: list[int], *,
                 m: int, renoise: str, w: float | None, checkpoint: bool, timestep_scaling: float):
        super().__init__()
        self.net = net
        self._frozen = (autoencoder,)
        self.schedule, self.prediction, self.timesteps = schedule, prediction, list(timesteps)
        self.m, self.renoise, self.w, self.checkpoint = m, renoise, w, checkpoint
        self.timestep_scaling = timestep_scaling

    def forward(self, images: Tensor, cond, z0: Tensor | None, z_T: Tensor, noises: list[Tensor], *,
                grad_from_step: int = 0) -> tuple[Tensor, Tensor]:
        student = Denoiser(self.net, self.schedule, self.prediction)
        return e2e_step(student, self._frozen[0], images, cond, timesteps=self.timesteps, m=self.m,
                        generator=None, renoise=self.renoise, w=self.w, checkpoint=self.checkpoint,
                        grad_from_step=grad_from_step, timestep_scaling=self.timestep_scaling, z0=z0, z_T=z_T,
                        noises=noises)


class PretrainedFinetuneTask(Task):
    kind = "finetune-pretrained"

    def __init__(self, cfg: PretrainedFinetuneRun, device: torch.device, output_dir: str | Path):
        from e2ediff.adapters.lora import add_lora
        from e2ediff.adapters.pipeline import load_pretrained
        from e2ediff.data.imagefolder import ImageFolderCaptions, caption_cache, latent_cache
        from e2ediff.schedules import pixart_lcm_timesteps

        pc = cfg.pretrained
        self.cfg, self.device, self.output_dir = cfg, device, Path(output_dir)
        self.pp = load_pretrained(cfg.init, device, pc.dtype, pc.max_sequence_length)
        trained = self.pp.trained.float()          # trained weights (and AdamW state) in float32
        if pc.lora_rank > 0:
            add_lora(trained, pc.lora_rank, pc.lora_alpha or None, pc.lora_targets)
        else:
            trained.requires_grad_(True)
        trained.train()
        if pc.compile:
            from e2ediff.adapters.speed import compile_network

            compile_network(self.pp.net)
        k = cfg.sampler_steps
        self.timesteps = (list(cfg.timesteps) if cfg.timesteps is not None else
                          self.pp.timesteps(k) if cfg.timestep_schedule == "lcm" else pixart_lcm_timesteps(k))
        self.w = cfg.w if cfg.w is not None else self.pp.default_w()
        self.data = ImageFolderCaptions(pc.train_data_dir, pc.resolution, pc.center_crop, pc.random_flip,
                                        pc.caption_column)
        cache_dir = Path(pc.cache_dir) if pc.cache_dir else self.output_dir / "cache"
        self.captions = caption_cache(self.pp.encode_prompts, self.data.captions, self.pp.text_encoder_key(),
                                      cache_dir)
        ae = self.pp.autoencoder
        self.latents = None
        if pc.cache_latents:
            vae_key = self.pp.pipe.vae.config.to_json_string() if hasattr(self.pp.pipe.vae.config, "to_json_string") \
                else json.dumps(dict(self.pp.pipe.vae.config), default=str)
            self.latents = latent_cache(ae.encode_latents, self.data, vae_key + str(self.pp.source), cache_dir,
                                        device)
        c, h, _ = self.pp.latent_shape(pc.resolution)
        self.objective = E2EObjective(cfg.loss, ae, text_dim=self.captions.dim, latent_channels=c,
                                      latent_size=h, image_channels=3, image_size=pc.resolution).to(device)
        unroll = E2EUnroll(self.pp.net, ae, self.pp.schedule, self.pp.prediction, self.timesteps,
                           m=cfg.samples_per_caption, renoise=cfg.renoise, w=self.w, checkpoint=cfg.checkpointing,
                           timestep_scaling=self.pp.timestep_scaling)
        self.parts = [Part("net", unroll, cfg.optim, cfg.train.ema_decay, trainable_only=True, ddp=True)]
        if self.objective.disc is not None:
            self.parts.append(Part("disc", self.objective.disc, cfg.disc_optim, 0.0, compile=False))
        self.stream = BatchStream(len(self.data), cfg.train.batch_size, cfg.train.seed)

    def draws(self, step: int) -> tuple[list[torch.Generator], torch.Generator]:
        """Every random draw of a step depends on the image's position in the global batch, never on the process
        that holds it: one generator per local image, seeded by (seed, step, global position), and one shared by
        all processes (seed, step, "all"). So a run on N processes equals one process with the N-fold batch, and a run
        resumed on another process count continues exactly."""
        from e2ediff.trainer import step_generator

        s = self.stream
        per = s.batch_size // s.world
        seed = self.cfg.train.seed
        images = [step_generator(seed, step, f"image{s.rank * per + j}", self.device) for j in range(per)]
        return images, step_generator(seed, step, "all", self.device)

    def losses(self, step, generator):
        cfg = self.cfg
        idx = self.stream.indices(step)
        per_image, shared = self.draws(step)
        images = torch.cat([self.data.images(idx[j:j + 1], g) for j, g in enumerate(per_image)]).to(self.device)
        caps = self.data.caption_index[idx]
        cond = self.captions[caps].to(self.device)
        z0 = None if self.latents is None else self.latents[idx].to(self.device)
        k, m = len(self.timesteps), cfg.samples_per_caption
        shape = (m, *self.pp.latent_shape(cfg.pretrained.resolution))
        draws = [[torch.randn(shape, generator=g, device=g.device) for _ in range(k)] for g in per_image]
        z_T = torch.cat([d[0] for d in draws]).to(self.device)            # [B·m, C, h, w], image i's m rows together
        noises = [torch.cat([d[i] for d in draws]).to(self.device) for i in range(1, k)]
        cut = k - cfg.truncate if cfg.truncate > 0 else 0
        if cfg.random_truncation:
            cut = int(torch.randint(0, k, (1,), generator=shared, device=shared.device))
        z0, z0_hat = self.module("net")(images, cond, z0, z_T, noises, grad_from_step=cut)
        per_image, logs = self.objective(z0_hat, z0, images, cond, caps.to(self.device), cfg.samples_per_caption)
        losses = {"net": per_image.mean()}
        if self.objective.disc is not None:
            losses["disc"], d_logs = self.objective.discriminator_loss(z0_hat, z0, images, cond,
                                                                       cfg.samples_per_caption)
            logs.update(d_logs)
        return losses, logs

    # ------------------------------------------------------------------------------------------------------------
    # Outputs a user loads without us

    def before_sharding(self):
        """FSDP is about to shard the trained network in place: process 0 keeps a whole copy on the CPU to export from."""
        if int(os.environ.get("RANK", 0)) != 0:
            return
        net = copy.deepcopy(self.pp.net).to("cpu")
        pipe = type(self.pp.pipe)(**{**self.pp.pipe.components, self.pp.trained_name: net.model})
        self._export_pp = replace(self.pp, pipe=pipe, net=net)

    def sampler_meta(self) -> dict:
        return {"name": "lcm", "steps": len(self.timesteps), "timesteps": self.timesteps, "w": self.w,
                "renoise": self.cfg.renoise}

    def export(self, weights):
        prefix = "net.model."                                        # E2EUnroll.net (adapter) .model (diffusers)
        ema = {k[len(prefix):]: v for k, v in weights["net"].items() if k.startswith(prefix)}
        base = Path(self.cfg.init).resolve() if Path(self.cfg.init).exists() else self.cfg.init   # path or hub id
        pp = getattr(self, "_export_pp", self.pp)                  # FSDP: the whole copy (before_sharding)
        write_outputs(pp, ema, self.cfg.pretrained, self.output_dir, self.sampler_meta(), str(base))
        return None


def _swap_in(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copy `tensors` into model's parameters of those names; returns the previous values."""
    params = dict(model.named_parameters())
    old = {}
    with torch.no_grad():
        for k, v in tensors.items():
            old[k] = params[k].detach().clone()
            params[k].copy_(v)
    return old


def _replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` at `final` (the old one removed only after the new one is complete)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    if old.exists():
        shutil.rmtree(old)


def _link_tree(src: Path, dst: Path, skip: str) -> None:
    """Hard-link (copy where links fail) every file of src into dst, except the folder `skip`."""
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if rel.parts[0] == skip or path.is_dir():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


def save_full_pipeline(pipe, trained_name: str, folder: Path, meta: dict, previous: Path | None = None) -> None:
    """A complete pipeline folder at `folder` from `pipe` (with its current weights), plus e2ediff.json. With
    `previous` (an earlier export of the same run) only the trained component `trained_name` is written; the other
    components' files are linked from it."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    if previous is not None and (previous / "model_index.json").is_file():
        _link_tree(previous, tmp, skip=trained_name)
        getattr(pipe, trained_name).save_pretrained(str(tmp / trained_name))
    else:
        pipe.save_pretrained(str(tmp))
    (tmp / "e2ediff.json").write_text(json.dumps(meta, indent=1) + "\n")
    _replace_dir(tmp, folder)


def write_outputs(pp, ema: dict[str, Tensor], pc: PretrainedConfig, out: Path, sampler: dict, base: str) -> None:
    from e2ediff.adapters.lora import merge_lora, save_peft_lora, save_sd_lora

    out = Path(out)
    meta = {"base": base, "family": pp.family, "sampler": sampler}
    model = pp.trained
    old = _swap_in(model, ema)                                       # sample with the EMA weights
    try:
        if pc.lora_rank == 0:
            save_full_pipeline(pp.pipe, pp.trained_name, out / "pipeline", meta, previous=out / "pipeline")
            return
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
        tmp = out / "lora.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        alpha = pc.lora_alpha or pc.lora_rank
        if pp.family == "pixart":
            save_peft_lora(model, tmp, pc.lora_rank, alpha, pc.lora_targets, state)
        else:
            save_sd_lora(type(pp.pipe), model, tmp, state)
        (tmp / "e2ediff.json").write_text(json.dumps({**meta, "lora": {"rank": pc.lora_rank, "alpha": alpha,
                                                                         "targets": list(pc.lora_targets)}},
                                                     indent=1) + "\n")
        _replace_dir(tmp, out / "lora")
        if pc.merge_lora:
            merged = merge_lora(copy.deepcopy(model))
            pipe = type(pp.pipe)(**{**pp.pipe.components, pp.trained_name: merged})
            save_full_pipeline(pipe, pp.trained_name, out / "pipeline_merged", meta)
    finally:
        _swap_in(model, old)


# ----------------------------------------------------------------------------------------------------------------------
# The command line's view


def cli_overrides(args) -> list[str]:
    """`finetune --pretrained ...` options as dotted overrides (before the user's own)."""
    out = [f"init={args.pretrained}"]
    if args.train_data_dir is not None:
        out.append(f"pretrained.train_data_dir={args.train_data_dir}")
    if args.resolution is not None:
        out.append(f"pretrained.resolution={args.resolution}")
    if args.lora_rank is not None:
        out.append(f"pretrained.lora_rank={args.lora_rank}")
    if args.merge_lora:
        out.append("pretrained.merge_lora=true")
    return out


def finetune_command(args, resolve_run, resolve_device) -> None:
    """`e2ediff finetune --pretrained ...`: resolve the config (preset → YAML → these options → overrides), train."""
    from e2ediff.trainer import train

    args.overrides = [*cli_overrides(args), *args.overrides]
    cfg = resolve_run(args, PRESETS)
    task = PretrainedFinetuneTask(cfg, resolve_device(cfg.train.device), args.run_dir)
    train(task, cfg.train, args.run_dir, cfg, args.command)
    if int(os.environ.get("RANK", 0)) == 0:
        made = "pipeline/" if cfg.pretrained.lora_rank == 0 else "lora/" + (" pipeline_merged/" if
                                                                            cfg.pretrained.merge_lora else "")
        print(f"{args.command}: {made} in {args.run_dir}")


def add_finetune_args(p) -> None:
    p.add_argument("--pretrained", help="diffusers pipeline folder or hub id (PixArt-α/δ, SD, SDXL), or an e2ediff "
                   "export; the run fine-tunes its transformer / UNet (same as init=...)")
    p.add_argument("--train-data-dir", type=Path, help="imagefolder: metadata.jsonl (file_name, text) + images")
    p.add_argument("--resolution", type=int, help="image size (resize shorter side + centre crop), e.g. 512 or 1024")
    p.add_argument("--lora-rank", type=int, help="peft LoRA rank on the attention projections; 0 or unset: full")
    p.add_argument("--merge-lora", action="store_true", help="also export the LoRA folded into the base pipeline")


@torch.no_grad()
def sample_images(source: str, prompts: list[str], output: Path, *, steps: int | None = None,
                  timesteps: list[int] | None = None, w: float | None = None, seed: int = 0,
                  resolution: int | None = None, device="cpu", dtype: str = "float32", fuse_qkv: bool = False,
                  compile: str | None = None, attention: str = "default", fp8: bool = False) -> Path:
    """PNGs (output/000.png, …) and latents.safetensors of `prompts` by the project's LCM sampler on a pipeline folder,
    hub id or e2ediff export. Timesteps / w default to the ones the run trained (e2ediff.json), else the scheduler's
    4 LCM steps. Noise: seed's generator, as `pipe(prompt, generator=torch.Generator().manual_seed(seed))` draws it.
    Speed (e2ediff.adapters.speed): dtype of the weights, fused q/k/v projections, FP8 matmuls in the transformer
    blocks, torch.compile mode (None: eager), the attention kernel tried first."""
    from PIL import Image
    from safetensors.torch import save_file

    from e2ediff.adapters import speed
    from e2ediff.adapters.lora import has_lora, merge_lora
    from e2ediff.adapters.pipeline import load_pretrained, sample_pretrained

    pp = load_pretrained(source, device, dtype)
    pp.trained.eval()
    if (fuse_qkv or fp8) and has_lora(pp.trained):
        merge_lora(pp.trained)              # fused and FP8 weights are copies of the base weights: adapters first
    if fuse_qkv:
        speed.fuse_qkv(pp.trained)
    if fp8:
        speed.float8_linear(pp.trained)
    if compile is not None:
        speed.compile_network(pp.net, compile)
    sampler = pp.meta.get("sampler", {})
    if timesteps is None:
        timesteps = (pp.timesteps(steps) if steps is not None else
                     sampler.get("timesteps") or pp.timesteps(4))
    w = w if w is not None else pp.default_w()
    cond = pp.encode_prompts(prompts)
    with speed.attention_backend(attention):
        z = sample_pretrained(pp, cond, list(timesteps), seed=seed, w=w, renoise=sampler.get("renoise", "vp"),
                              resolution=resolution)
    images = pp.autoencoder.decode_latents(z).float().clamp(-1, 1)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        array = ((img.permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
        Image.fromarray(array).save(output / f"{i:03d}.png")
    save_file({"latents": z.float().cpu().contiguous()}, str(output / "latents.safetensors"),
              metadata={"prompts": json.dumps(prompts), "timesteps": json.dumps(list(timesteps)), "w": json.dumps(w),
                        "seed": str(seed)})
    return output
