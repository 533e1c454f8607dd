"""CLI conveniences that map onto config keys, the PixArt timestep option, and the evaluate command."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import fake_env, fake_env_paths, pipeline_files, resolve_run  # noqa: F401  (fixtures)


def test_data_dir_and_skip_bad_files_flags_become_overrides(tmp_path):
    from e2ediff.cli import _resolve_run, build_parser
    from e2ediff.pretrain import PRESETS

    args = build_parser().parse_args(["pretrain", "--run-dir", str(tmp_path), "--data-dir", "/some/idx",
                                      "--skip-bad-files", "autoencoder=ae.safetensors"])
    cfg = _resolve_run(args, PRESETS)
    assert cfg.data.data_dir == "/some/idx"
    assert cfg.data.skip_bad_files is True
    args = build_parser().parse_args(["pretrain", "--run-dir", str(tmp_path), "autoencoder=ae.safetensors"])
    cfg = _resolve_run(args, PRESETS)
    assert cfg.data.data_dir is None and cfg.data.skip_bad_files is False


def test_finetune_timestep_schedules(fake_env, pipeline_files):
    from e2ediff.assets import TrainingData, load_pipeline
    from e2ediff.e2e import FinetuneTask

    init = f"init={pipeline_files['student']}"
    expected = {("lcm", 4): [999, 759, 499, 259], ("pixart", 4): [999, 759, 519, 279], ("lcm", 2): [999, 499]}
    for (schedule, k), timesteps in expected.items():
        cfg = resolve_run("finetune", init, f"sampler_steps={k}", f"timestep_schedule={schedule}")
        task = FinetuneTask(cfg, torch.device("cpu"), data=TrainingData(cfg.data, "train", "cpu"),
                            init=load_pipeline(pipeline_files["student"]))
        assert task.timesteps == timesteps
    cfg = resolve_run("finetune", init, "sampler_steps=2", "timesteps=[900,300]", "timestep_schedule=pixart")
    task = FinetuneTask(cfg, torch.device("cpu"), data=TrainingData(cfg.data, "train", "cpu"),
                        init=load_pipeline(pipeline_files["student"]))
    assert task.timesteps == [900, 300]   # an explicit list wins over the named schedule


@pytest.fixture
def classifier_dir(tmp_path):
    from e2ediff.metrics.classifier import ClassifierConfig, FashionClassifier, init_weights, save_classifier

    model = FashionClassifier(ClassifierConfig(channels=(8, 16), blocks=1))
    init_weights(model, torch.Generator().manual_seed(0))
    save_classifier(model.eval(), tmp_path / "classifier")
    return tmp_path / "classifier"


def test_evaluate_model_and_npz_agree(fake_env, pipeline_files, classifier_dir, tmp_path, capsys):
    """`evaluate --checkpoint --save-samples` and `evaluate --samples` on the saved npz give the same metrics."""
    from e2ediff.cli import main

    out_a, out_b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["evaluate", "--checkpoint", str(pipeline_files["teacher"]), "--classifier", str(classifier_dir),
                 "--num-samples", "40", "--steps", "2", "--device", "cpu", "--output", str(out_a),
                 "--save-samples", str(tmp_path / "s")]) == 0
    assert main(["evaluate", "--samples", str(tmp_path / "s" / "samples.npz"), "--classifier", str(classifier_dir),
                 "--device", "cpu", "--output", str(out_b)]) == 0
    a, b = json.loads(out_a.read_text()), json.loads(out_b.read_text())
    for key in ("fd", "kid_mean", "alignment", "diversity_rel"):
        assert np.isfinite(a[key]) and a[key] == pytest.approx(b[key], rel=1e-9, abs=1e-12), key
    assert a["n"] == 40 and a["nfe"] == 2 and a["timesteps"] == [999, 499]
    assert (tmp_path / "s" / "grid.png").exists()
    capsys.readouterr()


def test_evaluate_fp8_scores_the_quantized_network(fake_env, pipeline_files, classifier_dir, tmp_path, capsys):
    """`evaluate --fp8` draws the samples with FP8 matmuls in the network's blocks and says how many layers it
    quantized (the numbers: tests/test_fp8.py); with --samples the flag is refused (nothing is sampled)."""
    from e2ediff.cli import main
    from helpers import run_error

    scores = {}
    for name, extra in (("plain", []), ("fp8", ["--fp8"])):
        assert main(["evaluate", "--checkpoint", str(pipeline_files["teacher"]), "--classifier", str(classifier_dir),
                     "--num-samples", "20", "--steps", "2", "--device", "cpu", "--output", str(tmp_path / name),
                     "--save-samples", str(tmp_path / f"s_{name}"), *extra]) == 0
        scores[name] = json.loads((tmp_path / name).read_text())
    assert scores["plain"]["fp8_layers"] == 0 and scores["fp8"]["fp8_layers"] > 0
    plain, fp8 = (np.load(tmp_path / f"s_{n}" / "samples.npz")["images"].astype(float) for n in ("plain", "fp8"))
    assert np.abs(fp8 - plain).mean() <= 0.1 * np.abs(plain).mean()   # (equal here: a fresh DiT's last layer is 0)
    assert np.isfinite(scores["fp8"]["fd"])
    line = run_error(capsys, "evaluate", "--samples", tmp_path / "s_plain" / "samples.npz", "--fp8",
                     "--classifier", classifier_dir)
    assert line.startswith("--fp8: only with --checkpoint"), line


def test_evaluate_without_classifier_is_a_clear_error(fake_env, pipeline_files, tmp_path, capsys):
    from e2ediff.cli import main

    rc = main(["evaluate", "--checkpoint", str(pipeline_files["teacher"]), "--classifier", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and "train-classifier" in err[0]


def test_ema_warmup_and_plain_decay():
    """shadow ← d·shadow + (1 − d)·θ with d = min(decay, (1 + s)/(10 + s)); warmup=False keeps d = decay."""
    from e2ediff.ema import EMA

    model = torch.nn.Linear(3, 2)
    for warmup in (True, False):
        ema = EMA(model, 0.999, warmup=warmup)
        expected = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
        for step in range(5):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * (step + 1))
            ema.update(model, step)
            d = min(0.999, (1 + step) / (10 + step)) if warmup else 0.999
            for k, v in model.state_dict().items():
                expected[k] = d * expected[k] + (1 - d) * v.double()
        for k in expected:
            torch.testing.assert_close(ema.state_dict()[k].double(), expected[k], rtol=1e-6, atol=1e-6)
    assert EMA(model, 0.95).decay_at(10_000) == 0.95


def test_per_class_script_splits_the_alignment_by_class(classifier_dir, tmp_path):
    """scripts/per_class.py: each class's rate, checked against the classifier's predictions counted here, and the
    overall column equal to the evaluator's alignment on the same images."""
    import importlib.util

    from e2ediff.data.fashion_mnist import to_model_images
    from e2ediff.generate import save_samples_npz
    from e2ediff.metrics.classifier import load_classifier, predict
    from e2ediff.metrics.report import alignment

    spec = importlib.util.spec_from_file_location("per_class", Path(__file__).parent.parent / "scripts" / "per_class.py")
    per_class = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(per_class)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (60, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10), 6)
    (tmp_path / "s").mkdir()
    save_samples_npz(tmp_path / "s" / "samples.npz", images, labels, ["x"] * 60)
    classifier = load_classifier(classifier_dir)
    rates = per_class.per_class(tmp_path / "s", classifier)
    pred = predict(classifier, to_model_images(torch.as_tensor(images))).numpy()
    for c in range(10):
        assert rates[c] == sum(int(pred[i] == c) for i in range(60) if labels[i] == c) / 6
    assert rates[10] == pytest.approx(alignment(classifier, to_model_images(torch.as_tensor(images)), labels), abs=1e-12)
    assert rates[10] == pytest.approx(sum(rates[:10]) / 10, abs=1e-12)      # balanced classes: the plain mean
