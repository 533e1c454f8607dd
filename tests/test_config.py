"""Config system: presets, YAML + dotted overrides with types, strict validation naming the key, dump + reload."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from e2ediff import autoencoder_training, distill, e2e, pretrain
from e2ediff.config import (ConfigError, dump_yaml, from_dict, load_yaml, merge, parse_overrides, resolve, to_dict,
                            validate)

# Every command's presets, with the paths a real run must name.
REQUIRED = {"autoencoder": ["scale_samples=16"], "pretrain": ["autoencoder=ae.safetensors"],
            "distill": ["teacher=teacher.safetensors"], "finetune": ["init=student.safetensors"]}
MODULES = {"autoencoder": autoencoder_training, "pretrain": pretrain, "distill": distill, "finetune": e2e}
ALL_PRESETS = [(cmd, name) for cmd, module in MODULES.items() for name in module.PRESETS]


def finetune(*overrides: str):
    return resolve(e2e.PRESETS["tiny"], overrides=REQUIRED["finetune"] + list(overrides))


@pytest.mark.parametrize("command,preset", ALL_PRESETS, ids=[f"{c}-{p}" for c, p in ALL_PRESETS])
def test_presets_resolve_and_round_trip_through_yaml(command, preset, tmp_path):
    required = list(REQUIRED[command])
    if command == "finetune" and e2e.PRESETS[preset].loss.anchor_to == "teacher":   # the user names the teacher
        with pytest.raises(ConfigError, match="loss.teacher"):
            resolve(MODULES[command].PRESETS[preset], overrides=required)
        required.append("loss.teacher=teacher.safetensors")
    cfg = resolve(MODULES[command].PRESETS[preset], overrides=required)
    path = tmp_path / "config.yaml"
    dump_yaml(cfg, path, command=command)
    data = yaml.safe_load(path.read_text())
    assert data["command"] == command
    again = from_dict(type(cfg), data)
    assert again == cfg
    assert resolve(MODULES[command].PRESETS[preset], path) == cfg      # the dumped file is a valid --config
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic write left no temp file


def test_presets_are_not_mutated_by_resolve():
    before = to_dict(pretrain.PRESETS["tiny"])
    resolve(pretrain.PRESETS["tiny"], overrides=["autoencoder=x", "model.depth=1", "train.steps=3"])
    assert to_dict(pretrain.PRESETS["tiny"]) == before


def test_yaml_then_overrides_merge_with_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1\n  warmup_steps: 5\nloss:\n  l2: 0.5\n  energy: 2\ntrain:\n  steps: 7\n"
                    "timesteps: [999, 759, 499, 259]\n")
    cfg = resolve(e2e.PRESETS["tiny"], path, REQUIRED["finetune"] + ["train.steps=9", "loss.energy=0.25",
                                                                      "optim.weight_decay=1e-8", "w=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)                 # int -> float
    assert cfg.optim.warmup_steps == 5 and isinstance(cfg.optim.warmup_steps, int)
    assert cfg.loss.l2 == 0.5 and cfg.loss.energy == 0.25                         # override beats YAML
    assert cfg.train.steps == 9
    assert cfg.optim.weight_decay == 1e-8                                          # 1e-8: a string to YAML 1.1
    assert cfg.timesteps == (999, 759, 499, 259) and isinstance(cfg.timesteps, tuple)
    assert cfg.w is None
    assert cfg.train.batch_size == e2e.PRESETS["tiny"].train.batch_size           # untouched keys keep the preset


@pytest.mark.parametrize("override,key", [("train.steps=abc", "train.steps"), ("train.steps=1.5", "train.steps"),
                                          ("train.deterministic=3", "train.deterministic"),
                                          ("optim.lr=fast", "optim.lr"), ("optim.lr=true", "optim.lr"),
                                          ("timesteps=[999,abc,499,259]", "timesteps[1]"),
                                          ("model.hidden_size=32", "model"), ("init=[1,2]", "init")])
def test_wrong_types_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        finetune(override)
    assert key in str(info.value)


@pytest.mark.parametrize("override,key", [("train.stepz=3", "train.stepz"), ("model.hiden_size=32", "model.hiden_size"),
                                          ("sampler_stepz=4", "sampler_stepz"), ("loss.l3=1", "loss.l3")])
def test_unknown_keys_are_rejected_with_the_dotted_name(override, key):
    module, cfg_required = (pretrain, ["autoencoder=x"]) if override.startswith("model.") else (e2e, REQUIRED["finetune"])
    with pytest.raises(ConfigError) as info:
        resolve(module.PRESETS["tiny"], overrides=cfg_required + [override])
    assert repr(key) in str(info.value) or key in str(info.value)
    assert "unknown" in str(info.value)


def test_unknown_key_in_a_yaml_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  hiden_size: 32\n")
    with pytest.raises(ConfigError) as info:
        resolve(pretrain.PRESETS["tiny"], path, ["autoencoder=x"])
    assert str(path) in str(info.value) and "model.hiden_size" in str(info.value)


@pytest.mark.parametrize("override,key", [
    ("train.batch_size=0", "train.batch_size"), ("train.steps=0", "train.steps"),
    ("sampler_steps=0", "sampler_steps"), ("loss.l2=-1", "loss.l2"),
    ("samples_per_caption=1", "samples_per_caption"),             # with the default loss.energy = 1
    ("train.ema_decay=1", "train.ema_decay"), ("optim.lr=0", "optim.lr"), ("disc_optim.lr=-1e-4", "disc_optim.lr"),
    ("data.caption_dropout=1.0", "data.caption_dropout"), ("timesteps=[999,759]", "timesteps"),
    ("truncate=5", "truncate"), ("train.device=tpu", "train.device")])
def test_impossible_values_are_rejected_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        finetune(override)
    message = str(info.value)
    assert f"{key}=" in message, message


def test_samples_per_caption_one_is_fine_without_the_energy_loss():
    cfg = finetune("samples_per_caption=1", "loss.energy=0", "loss.l2=1")
    assert cfg.samples_per_caption == 1


def test_model_config_errors_name_the_section():
    with pytest.raises(ConfigError) as info:
        resolve(pretrain.PRESETS["tiny"], overrides=["autoencoder=x", "model.hidden_size=30"])
    assert "model" in str(info.value) and "hidden_size" in str(info.value)
    with pytest.raises(ConfigError, match="model.*norm_groups"):
        resolve(autoencoder_training.PRESETS["tiny"], overrides=["model.channels=[8,16,30]", "model.norm_groups=4"])


@pytest.mark.parametrize("override,bad", [("train.mixed_precision=fp32", "fp32"), ("loss.energy_form=mean", "mean"),
                                          ("renoise=ode", "ode")])
def test_literal_values_are_checked(override, bad):
    with pytest.raises(ConfigError) as info:
        finetune(override)
    assert repr(bad) in str(info.value) and override.split("=")[0] in str(info.value)
    ok = finetune("train.mixed_precision=bf16", "loss.energy_form=distance", "renoise=ve")
    assert (ok.train.mixed_precision, ok.loss.energy_form, ok.renoise) == ("bf16", "distance", "ve")


@pytest.mark.parametrize("item", ["train.steps", "=3", "train..steps=3", "train.steps=[1"])
def test_malformed_overrides_are_rejected(item):
    with pytest.raises(ConfigError) as info:
        parse_overrides([item])
    assert repr(item) in str(info.value)


def test_override_of_a_section_by_a_scalar_is_rejected():
    with pytest.raises(ConfigError, match="train"):
        finetune("train=3")


def test_load_yaml_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=str(bad)):
        load_yaml(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1\n")
    with pytest.raises(ConfigError, match=str(broken)):
        load_yaml(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_from_dict_rejects_a_stale_key():
    data = to_dict(finetune())
    data["loss"]["old_weight"] = 1.0
    with pytest.raises(ConfigError, match="loss.old_weight"):
        from_dict(e2e.FinetuneRun, data)


def test_merge_and_validate_directly():
    cfg = merge(pretrain.PRESETS["tiny"], {"autoencoder": "x", "train": {"steps": 3}})
    assert cfg.train.steps == 3 and cfg.train.batch_size == pretrain.PRESETS["tiny"].train.batch_size
    validate(cfg)
    with pytest.raises(ConfigError, match="train.keep_last"):
        validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, keep_last=0)))


def test_a_bare_no_is_the_literal_no_where_a_choice_has_it():
    cfg = resolve(e2e.PRESETS["tiny"], overrides=REQUIRED["finetune"] + ["train.compile=no"])
    assert cfg.train.compile == "no"
    with pytest.raises(ConfigError, match="train.compile"):
        resolve(e2e.PRESETS["tiny"], overrides=REQUIRED["finetune"] + ["train.compile=yes"])
