"""Exports (shufflenet_jax.interop.export): StableHLO, ONNX and LiteRT files compute what the
JAX model computes; int8 files classify like it; eval.py evaluates them like a checkpoint.

Width 0.5 at 32x32 with random weights and random BatchNorm statistics (every layer and fold
is exercised, and the logits are of order 1, so a wrong layer cannot hide under the bound).
The ONNX and LiteRT tests need `.[export]` (onnx, onnxruntime, TensorFlow, ai-edge-litert).
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import digits as digits_config
from shufflenet_jax import evaluation, sources
from shufflenet_jax.data import calibration as calibration_data
from shufflenet_jax.interop import export
from shufflenet_jax.model.network import abstract_model, with_values

from .helpers import ROOT, random_values, run_readme_command, set_fields

SIZE = 32


def random_model(seed=0, num_classes=10):
    abstract = abstract_model(0.5, num_classes)
    return with_values(abstract, random_values(abstract, seed))


@pytest.fixture(scope="module")
def model():
    return random_model()


EXPORT = pytest.mark.export


@pytest.mark.parametrize(
    "fmt, layout",
    [
        ("stablehlo", "nhwc"),
        pytest.param("onnx", "nhwc", marks=EXPORT),
        pytest.param("onnx", "nchw", marks=EXPORT),
        pytest.param("tflite", "nhwc", marks=EXPORT),
    ],
)
def test_every_format_computes_what_the_jax_model_computes(model, tmp_path, fmt, layout):
    out = tmp_path / f"m{export.SUFFIXES[fmt]}"
    report = export.export(model, fmt, out, image_size=SIZE, batch=2, layout=layout)
    x = export.check_input(SIZE, 2, seed=1)
    want, got = export.reference(model)(x), export.load(out)(x)
    assert np.abs(want).max() > 1  # logits of a real scale: a wrong layer shows
    assert np.abs(got - want).max() <= export.tolerance(want)
    assert report["max_abs_diff"] <= report["tolerance"] and report["bytes"] == out.stat().st_size


@EXPORT
@pytest.mark.parametrize("width", [0.5, 1.0, 1.5, 2.0])
def test_the_onnx_export_matches_every_width(tmp_path, width):
    """Within 1e-4 on logits of a trained model's scale (about 10: random weights give far
    larger ones, so the classifier is scaled down to that)."""
    abstract = abstract_model(width, 7)
    model = with_values(abstract, random_values(abstract, 3))
    scale = np.abs(export.reference(model)(export.check_input(SIZE, 3))).max() / 10
    model.fc.kernel[...] /= scale
    model.fc.bias[...] /= scale
    report = export.export(model, "onnx", tmp_path / "m.onnx", image_size=SIZE, batch=None)
    assert report["max_abs_diff"] <= min(1e-4, report["tolerance"]), report


def test_a_missing_converter_names_the_extra_to_install(monkeypatch):
    import importlib

    real = importlib.import_module

    def without_onnxruntime(name, *args):
        if name.startswith("onnxruntime"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_onnxruntime)
    with pytest.raises(ImportError, match=r"needs onnxruntime: pip install -e \"\.\[export\]\""):
        export.require("onnxruntime.quantization")


@pytest.mark.parametrize("fmt", ["stablehlo", pytest.param("onnx", marks=EXPORT)])
def test_a_dynamic_batch_export_runs_at_batch_1_and_3(model, tmp_path, fmt):
    out = tmp_path / f"m{export.SUFFIXES[fmt]}"
    export.export(model, fmt, out, image_size=SIZE, batch=None)
    predict, reference = export.load(out), export.reference(model)
    for batch in (1, 3):
        x = export.check_input(SIZE, batch, seed=batch)
        want = reference(x)
        assert predict(x).shape == want.shape
        assert np.abs(predict(x) - want).max() <= export.tolerance(want)


@EXPORT
def test_a_static_batch_file_predicts_any_batch_in_chunks(model, tmp_path):
    out = tmp_path / "m.tflite"
    export.export(model, "tflite", out, image_size=SIZE, batch=2)
    x = export.check_input(SIZE, 5, seed=2)
    want = export.reference(model)(x)
    assert np.abs(export.load(out)(x) - want).max() <= export.tolerance(want)


def test_the_stablehlo_export_serves_three_platforms_with_xla_operations_only(model, tmp_path):
    from jax import export as jax_export

    out = tmp_path / "m.jaxexport"
    export.export(model, "stablehlo", out, image_size=SIZE, batch=None)
    exported = jax_export.deserialize(bytearray(out.read_bytes()))
    assert exported.platforms == ("cpu", "cuda", "tpu")
    text = exported.mlir_module()
    assert "stablehlo.convolution" in text  # the model is in it
    # jax.export's own check of the symbolic batch is the one custom call; no C++ kernel
    assert set(re.findall(r"stablehlo\.custom_call @(\w+)", text)) == {"shape_assertion"}


def test_bad_requests_are_one_clear_line(model, tmp_path):
    with pytest.raises(ValueError, match="unknown format 'keras'"):
        export.export(model, "keras", tmp_path / "m.keras")
    with pytest.raises(ValueError, match="static batch"):
        export.export(model, "tflite", tmp_path / "m.tflite", batch=None)
    with pytest.raises(ValueError, match="unknown suffix"):
        export.load(tmp_path / "m.pt")
    values = random_values(abstract_model(0.5, 10), 0)
    values["fc"]["bias"][3] = np.nan
    with pytest.raises(ValueError, match="non-finite values at fc.bias"):
        export.export_model(with_values(abstract_model(0.5, 10), values))


@EXPORT
def test_export_cli_refuses_a_checkpoint_of_other_classes_in_one_line(tmp_path):
    from shufflenet_jax.model.model_file import save_model

    save_model(tmp_path / "ckpt", random_model())
    out = subprocess.run(
        [sys.executable, "-m", "shufflenet_jax.interop.export", "--checkpoint",
         str(tmp_path / "ckpt"), "--num_classes", "1000", "--format", "onnx", "--out",
         str(tmp_path / "m.onnx")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 1 and not (tmp_path / "m.onnx").exists()
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "10 classes, but 0.5x with 1000 classes" in last


@pytest.fixture(scope="module")
def trained(quickstart_run):
    """README's quickstart run (conftest.py): a model whose classes are separated as a trained
    one's are, unlike random weights'. (config, its newest model, that model's top-1 on the
    test split, the run's workdir)"""
    _, data_dir, workdir, output = quickstart_run
    config = set_fields(digits_config.get_config(), data_dir=data_dir, num_devices=1)
    model = sources.load_models(config, workdir=workdir)["model"]
    top1 = float(re.search(r"final eval: top-1 ([\d.]+)", output).group(1))
    return config, model, top1, workdir


@EXPORT
@pytest.mark.parametrize("fmt", ["onnx", "tflite"])
def test_int8_exports_classify_digits_like_the_float_model(trained, tmp_path, fmt):
    config, model, top1, _ = trained
    calibration = calibration_data.calibration_images(config, 4, 64)
    images, source = calibration_data.held_out_images(config, 10_000)
    out = tmp_path / f"q{export.SUFFIXES[fmt]}"
    report = export.export(
        model, fmt, out, image_size=SIZE, batch=1, calibration=calibration,
        check_images=images, check_source=source,
    )  # fmt: skip
    assert report["int8"] and report["bytes"] < 0.5 * len(export.to_onnx(model, SIZE, 1, "nhwc"))
    float_logits = export.reference(model)(images)
    agree = export.load(out)(images).argmax(-1) == float_logits.argmax(-1)
    assert report["checked_on"] == "359 images of digits's test split"
    assert report["top1_agreement"] == pytest.approx(agree.mean())
    best_two = np.sort(float_logits, -1)[:, -2:]
    clear = best_two[:, 1] - best_two[:, 0] >= 2.0
    print(f"{fmt} int8: top-1 agreement {agree.mean():.3f} on {len(images)} digits, "
          f"{agree[clear].mean():.3f} on the {clear.sum()} with a margin of 2 logits")  # fmt: skip
    # int8 moves a logit by about 0.2 here (a logit scale of 15; 256 levels per activation,
    # 129 per ONNX weight channel), so a class changes only where the float model's two best
    # logits are closer than that. On the quickstart's model (1,500 steps), measured on an AMD
    # EPYC Zen 3 (AVX2, no VNNI): 0.989 (ONNX) and 0.989 (LiteRT) overall, 0.997 and 1.0 on
    # the 331 of 359 with a margin of 2 logits; on a 300-step model 0.944 and 0.969 there,
    # 0.92-0.97 on Sapphire Rapids (VNNI, AMX). The bound holds on
    # every CPU kind because the integer sums are exact on each: ONNX Runtime's kernels
    # accumulate in int32 with VNNI, and without it add pairs in int16, which 7-bit weights
    # cannot overflow (the test below); XNNPACK's int8 kernels in LiteRT accumulate in int32
    # on every ISA. What differs between kinds is float rounding in the requantization.
    assert agree.mean() >= 0.85 and agree[clear].mean() >= 0.99 and clear.mean() >= 0.1
    metrics = evaluation.evaluate_exported(out, config, evaluation.eval_split(config))
    assert metrics["examples"] == 359 and abs(metrics["top1"] - top1) <= 0.1


@EXPORT
def test_int8_onnx_products_cannot_saturate_without_vnni(trained, tmp_path):
    """The property that makes an int8 ONNX file right on x86 CPUs without VNNI, checked on the
    file on any CPU: ONNX Runtime's uint8 x int8 kernels there add two products into an int16
    (`vpmaddubsw`), so 255 * (|w1| + |w2|) must stay within 32,767 for every weight pair.
    8-bit weights reach 255 * 254 = 64,770; the 7-bit ones written reach 255 * 128 = 32,640.
    Per pair: every adjacent pair of each written weight row, at the largest activation."""
    import onnx
    from onnx import numpy_helper

    config, model, _, _ = trained
    out = tmp_path / "q.onnx"
    export.export(model, "onnx", out, image_size=SIZE, calibration=
                  calibration_data.calibration_images(config, 2, 64))  # fmt: skip
    bound = export.u8s8_pair_sum_bound(out.read_bytes())
    assert 0 < bound <= export.INT16_MAX, bound
    # the worst pair of adjacent reduction-axis products over real weights, activations at 255
    graph = onnx.load(out).graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer]
    int8 = [w.astype(np.int32) for w in weights if w.dtype == np.int8 and w.ndim >= 2]
    assert len(int8) > 50  # every convolution and the classifier (the QDQ graph's weights)
    for w in int8:
        rows = w.reshape(w.shape[0], -1)  # output channel x reduction axis
        pairs = rows[:, : rows.shape[1] // 2 * 2].reshape(len(rows), -1, 2)
        worst = 255 * np.maximum(np.clip(pairs, 0, None).sum(-1), -np.clip(pairs, None, 0).sum(-1))
        assert worst.max(initial=0) <= export.INT16_MAX


@EXPORT
@pytest.mark.torch
def test_the_deployment_benchmark_times_every_runtime_at_a_tiny_size(tmp_path):
    out = tmp_path / "deploy.json"
    run = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--deploy", "--widths", "0.5",
         "--batches", "2", "--size", "32", "--repeats", "1", "--images", "2",
         "--omp-wait-policy", "unset", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    (row,) = json.loads(out.read_text())["results"]
    for name in ("readme", "nnx_jit", "ort_torchvision", "ort_ours_int8", "litert_ours"):
        assert row[f"{name}_img_s"] > 0, name
        assert name == "readme" or f"ratio_readme_vs_{name}" in row, name


@EXPORT
def test_the_readme_int8_export_of_a_run_directory_evaluates_like_the_trained_model(
    trained, digits_data_dir, tmp_path
):
    """README's commands (fewer calibration and check images): the run directory (its best
    model, at the 32x32 it was trained at, with no --image_size) exported to int8 LiteRT, its
    report measured on held-out digits, then eval.py on the file: the trained model's top-1
    within the int8 cost (the test above)."""
    _, _, top1, workdir = trained
    out = tmp_path / "digits_int8.tflite"
    made = run_readme_command(
        "-m", "shufflenet_jax.interop.export", "--checkpoint", str(workdir), "--format",
        "tflite", "--int8", "--calibration_config", "configs/digits.py", "--calibration_batches",
        "2", "--check_images", "200", "--out", str(out), data_dir=digits_data_dir,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    line = made.stdout.strip().splitlines()[-1]
    match = re.search(r"on 200 images of digits's test split, .* top-1 agreement ([\d.]+)%", line)
    assert match and float(match.group(1)) >= 85, line  # the bound of the test above
    evaluated = run_readme_command("eval.py", "--config", "configs/digits.py", "--tflite",
                                   str(out), data_dir=digits_data_dir)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    row = evaluated.stdout.strip().splitlines()[-1].split()
    assert row[0] == "exported" and row[4] == "359" and abs(float(row[1]) - top1) <= 0.1, row


def test_a_file_given_images_of_another_size_says_so_in_one_line(model, tmp_path):
    out = tmp_path / "m.jaxexport"
    export.export(model, "stablehlo", out, image_size=40, batch=None)
    with pytest.raises(ValueError, match=r"m\.jaxexport takes 40x40 images, not 32x32"):
        export.load(out)(export.check_input(SIZE, 1))


@EXPORT
def test_export_of_a_bad_source_is_one_line_naming_it(trained, tmp_path):
    """A missing path, a run's training-state checkpoint (pointing at the run's models) and a
    text file given as torchvision weights: one line, exit status 1, nothing written."""
    workdir = trained[3]
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights\n")
    step = next(p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], "nope does not exist"),
        (["--checkpoint", str(step)], f"that run's models are in {workdir / 'best'}"),
        (["--torch_weights", str(notes)], "notes.txt as a torch weights file"),
    ]
    for source, message in cases:
        out = tmp_path / "m.onnx"
        done = run_readme_command("-m", "shufflenet_jax.interop.export", *source, "--format",
                                  "onnx", "--out", str(out))  # fmt: skip
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and message in lines[0], done.stderr
        assert not out.exists()


@pytest.mark.os_level  # which directory holds the model: the first leg's (the quickstart's run)
def test_a_run_directory_is_read_as_its_best_model_at_its_image_size(trained):
    from shufflenet_jax.model import model_file

    config, _, _, workdir = trained
    (best,) = [p for p in (workdir / "best").iterdir() if p.name.isdigit()]
    for given in (workdir, workdir / "best"):
        assert model_file.model_directory(given) == str(best)
        assert model_file.read_model_config(given)["image_size"] == SIZE
    models = sources.load_models(config, checkpoint_dir=workdir)  # eval.py --checkpoint RUN
    want = export.reference(model_file.restore_model(best))(export.check_input(SIZE, 2))
    got = export.reference(models["model"])(export.check_input(SIZE, 2))
    np.testing.assert_array_equal(got, want)
