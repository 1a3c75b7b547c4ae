"""eval.py and shufflenet_jax.evaluation: trained, converted and torchvision weights; images."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import digits as digits_config
from shufflenet_jax import classification, evaluation, predictor, recalibration, sources
from shufflenet_jax.data import normalization
from shufflenet_jax.data import pipeline as input_pipeline
from shufflenet_jax.interop.compare import randomize_batchnorm
from shufflenet_jax.model import model_file
from shufflenet_jax.model.network import abstract_model
from shufflenet_jax.train.loop import train_and_evaluate

from .helpers import random_values, set_fields
from .test_input_pipeline import smooth_jpeg
from .test_training import ROOT, small_config


@pytest.fixture(scope="module")
def trained(digits_data_dir, tmp_path_factory):
    """A short digits run with EMA: (config, workdir, the loop's final eval metrics)."""
    workdir = tmp_path_factory.mktemp("run")
    config = small_config(digits_data_dir, total_steps=20, eval_every=20, ema_decay=0.9)
    result = train_and_evaluate(config, workdir)
    return config, workdir, result.eval_metrics


def test_eval_of_a_training_run_reports_the_loops_final_top1(trained):
    config, workdir, loop = trained
    models = sources.load_models(config, workdir=workdir)
    assert set(models) == {"model", "ema"}
    split = evaluation.eval_split(config)
    metrics, predictions = evaluation.evaluate_model(models["model"], config, split)
    assert metrics["examples"] == 359 and np.all(predictions >= 0)
    assert metrics["top1"] == loop["top1"] and metrics["top5"] == loop["top5"]
    ema, _ = evaluation.evaluate_model(models["ema"], config, split)
    assert ema["top1"] == loop["ema_top1"]
    (best,) = [p for p in (workdir / "best").iterdir() if p.name.isdigit()]
    from_best = sources.load_models(config, checkpoint_dir=best)["model"]
    assert evaluation.evaluate_model(from_best, config, split)[0]["top1"] == loop["top1"]


def test_a_training_run_is_restored_for_evaluation_without_an_optimizer(trained, monkeypatch):
    from shufflenet_jax.train import optim

    def no_optimizer(*args, **kwargs):
        raise AssertionError("evaluation built an optimizer")

    config, workdir, loop = trained
    monkeypatch.setattr(optim, "make_optimizer", no_optimizer)
    models = sources.load_models(config, workdir=workdir)
    split = evaluation.eval_split(config)
    assert evaluation.evaluate_model(models["ema"], config, split)[0]["top1"] == loop["ema_top1"]


def test_eval_cli_prints_a_table_and_writes_json_for_both_weights(trained, tmp_path):
    config, workdir, loop = trained
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            "--config",
            str(ROOT / "configs" / "digits.py"),
            f"--config.data.data_dir={config.data.data_dir}",
            "--config.train.num_devices=1",
            "--config.optim.ema_decay=0.9",
            f"--workdir={workdir}",
            f"--json={tmp_path / 'eval.json'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "digits/test" in out.stdout and "ema" in out.stdout
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["model"]["top1"] == loop["top1"] and result["model"]["examples"] == 359
    assert result["ema"]["top1"] == loop["ema_top1"]


@pytest.mark.torch
def test_torchvision_weights_give_torchvisions_predictions(digits_data_dir, tmp_path):
    import torch
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    randomize_batchnorm(reference, seed=1)
    reference.eval()
    torch.save(reference.state_dict(), tmp_path / "x0_5.pth")
    config = small_config(digits_data_dir)
    split = evaluation.eval_split(config)
    model = sources.load_models(config, torch_weights=tmp_path / "x0_5.pth")["model"]

    expected = np.full(len(split), -1)
    transform = input_pipeline.EvalTransform(config.data.image_size, config.data.eval_resize)
    for batch in input_pipeline.eval_dataset(split, batch_size=64, transform=transform):
        with torch.no_grad():
            images = normalization.standardize(batch["image"])
            logits = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
        expected[batch["index"][batch["mask"]]] = logits.argmax(-1)[batch["mask"]]
        # Equal predictions follow from the logits' agreement (1e-4 of their scale, measured
        # 1e-6; float32 accumulation in oneDNN's AVX2, AVX-512 and AMX paths alike, torch's
        # default "highest" float32 precision) only where no two best logits are that close:
        # assert so, so that another CPU's rounding cannot decide the comparison below.
        top2 = np.sort(logits[batch["mask"]], -1)[:, -2:]
        assert torch.get_float32_matmul_precision() == "highest"
        assert (top2[:, 1] - top2[:, 0]).min() > 1e-3 * max(1.0, np.abs(logits).max())
    labels = np.array([split.source[i]["label"] for i in range(len(split))])

    # batch sizes that do and do not divide 359, on one device and on eight
    for eval_batch, devices in ((64, 1), (512, 1), (200, 8)):
        set_fields(config, eval_batch_size=eval_batch, num_devices=devices)
        metrics, predictions = evaluation.evaluate_model(model, config, split)
        assert metrics["examples"] == 359
        np.testing.assert_array_equal(predictions, expected)
        assert metrics["top1"] == pytest.approx(np.mean(expected == labels), abs=1e-12)


def test_recalibrated_batchnorm_holds_the_cumulative_average_of_batch_statistics():
    model = abstract_model(0.5, 10)
    nnx.update(model, random_values(model, seed=2))
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(4, 32, 32, 3)).astype(np.float32)} for _ in range(3)]
    recalibrated = recalibration.recalibrate_batchnorm(model, iter(batches), 3)
    kernel = np.asarray(model.conv1.layers[0].kernel[...])
    means, variances = [], []
    for b in batches:
        y = jax.lax.conv_general_dilated(
            b["image"], kernel, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        means.append(np.mean(y, axis=(0, 1, 2)))
        variances.append(np.var(y, axis=(0, 1, 2)))
    bn = recalibrated.conv1.layers[1]
    np.testing.assert_allclose(bn.mean[...], np.mean(means, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn.var[...], np.mean(variances, 0), rtol=1e-4, atol=1e-5)
    assert bn.momentum == 0.9
    # the original model is untouched
    assert not np.allclose(model.conv1.layers[1].mean[...], bn.mean[...])


def test_classify_images_names_imagenet_classes_and_the_unreadable_file(tmp_path):
    names = classification.imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "golden retriever"
    model = abstract_model(0.5, 1000)
    nnx.update(model, random_values(model, seed=3))
    smooth_jpeg(tmp_path / "a.jpg", 300, 200)
    transform = input_pipeline.EvalTransform(64, 72)
    image = transform(input_pipeline.decode_image((tmp_path / "a.jpg").read_bytes(), "a.jpg"))
    # random running statistics give logits of millions: scale the fc layer to logits of a few
    # units, so that the softmax is spread and its five largest are distinct
    model.fc.bias[...] = np.zeros(1000, np.float32)
    model.fc.kernel[...] *= 3.0 / np.max(np.abs(predictor(model)(image[None])))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    paths = [str(tmp_path / "bad.jpg"), str(tmp_path / "a.jpg")]
    bad, good = classification.classify_images(model, paths, transform, names)
    assert "bad.jpg" in bad["error"] and "cannot decode" in bad["error"]
    assert len(good["top"]) == 5
    probs = [t["probability"] for t in good["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert all(t["name"] == names[t["class"]] for t in good["top"])
    # the five are the five largest of the model's softmax on the transformed image, with
    # their probabilities (float32 rounding of a softmax over 1000 logits: about 1e-7)
    want = np.asarray(jax.nn.softmax(predictor(model)(image[None])))[0]
    ranked = np.argsort(-want)
    assert want[ranked[4]] - want[ranked[5]] > 1e-5  # no near tie at the cut (seed 3)
    assert [t["class"] for t in good["top"]] == ranked[:5].tolist()
    np.testing.assert_allclose(probs, want[ranked[:5]], rtol=0, atol=1e-6)


def test_eval_refuses_mismatched_models_missing_splits_and_ambiguous_sources(
    digits_data_dir, tmp_path
):
    model = abstract_model(0.5, 1000)
    nnx.update(model, random_values(model, seed=4))
    model_file.save_model(tmp_path / "x0_5", model)
    config = digits_config.get_config()
    config.data.data_dir = digits_data_dir
    with pytest.raises(ValueError, match="a 0.5x model with 1000 classes, but 0.5x with 10 "):
        sources.load_models(config, checkpoint_dir=tmp_path / "x0_5")
    with pytest.raises(ValueError, match="no split 'validation'"):
        evaluation.eval_split(config, "validation")
    with pytest.raises(ValueError, match="exactly one of"):
        sources.load_models(config, workdir=tmp_path, checkpoint_dir=tmp_path / "x0_5")
    with pytest.raises(ValueError, match="no usable training checkpoint"):
        sources.load_models(config, workdir=tmp_path / "empty")


def test_a_training_run_evaluates_over_eight_devices_as_over_one(trained):
    """eval.py on a machine with several devices (the run's weights restored onto one of them,
    the batches split over all): the same counts as on one device."""
    config, workdir, _ = trained
    split = evaluation.eval_split(config)
    results = {}
    for devices in (1, 8):
        c = set_fields(digits_config.get_config(), data_dir=config.data.data_dir,
                       num_devices=devices, eval_batch_size=128)  # fmt: skip
        model = sources.load_models(c, workdir=workdir)["model"]
        results[devices] = evaluation.evaluate_model(model, c, split)
    assert results[8][0]["examples"] == results[1][0]["examples"] == 359
    # each image's float32 logits on 8 devices and on 1 agree to rounding (other compiled
    # batch shapes), so a prediction can differ only at a near tie: at most one of 359
    assert np.sum(results[8][1] != results[1][1]) <= 1
