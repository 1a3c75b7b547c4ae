"""The converter and compare command lines, and the model checkpoint format they write."""

import json
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image

from shufflenet_jax.interop import compare, convert
from shufflenet_jax.interop.compare import random_torchvision_model
from shufflenet_jax.interop.convert import load_torchvision
from shufflenet_jax.model.model_file import read_model_config, restore_model

pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "x0_5.pth"
    torch.save(random_torchvision_model(0.5, num_classes=10, seed=4).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoint_dir(weights_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "x0_5"
    convert.main(["--torch_weights", str(weights_file), "--out", str(out)])
    return out


def flat_values(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_converted_checkpoint_restores_the_same_weights(weights_file, checkpoint_dir):
    config = read_model_config(checkpoint_dir)
    assert config["width"] == 0.5 and config["num_classes"] == 10
    assert config["source"] == str(weights_file)
    restored, direct = (
        flat_values(restore_model(checkpoint_dir)),
        flat_values(load_torchvision(weights_file)),
    )
    chex.assert_trees_all_equal(restored, direct)


def test_to_torch_writes_the_original_state_dict(weights_file, checkpoint_dir, tmp_path):
    out = tmp_path / "back.pth"
    convert.main(["--to-torch", "--checkpoint", str(checkpoint_dir), "--out", str(out)])
    original = torch.load(weights_file, weights_only=True)
    back = torch.load(out, weights_only=True)
    assert list(back) == list(original)
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_restoring_with_another_width_or_class_count_fails(checkpoint_dir):
    with pytest.raises(ValueError, match=r"holds a 0\.5x model with \d+ classes, but 1\.0x with"):
        restore_model(checkpoint_dir, width=1.0)
    with pytest.raises(ValueError, match="10 classes, but 0.5x with 1000 classes"):
        restore_model(checkpoint_dir, num_classes=1000)


def test_restoring_a_directory_that_is_no_checkpoint_fails(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a shufflenet_jax model checkpoint"):
        restore_model(tmp_path)


def test_convert_refuses_to_overwrite_and_reports_bad_weights(checkpoint_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(["--torch_weights", "x.pth", "--out", str(checkpoint_dir)])
    assert e.value.code == 2 and "exists; refusing to overwrite" in capsys.readouterr().err
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit) as e:
        convert.main(["--torch_weights", str(tmp_path / "bad.pth"), "--out", str(tmp_path / "o")])
    assert e.value.code == 1
    assert "missing key 'stage2.0.branch1.2.weight'" in capsys.readouterr().err


def test_a_file_that_is_not_torch_weights_is_one_line_naming_it(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(SystemExit) as e:
        convert.main(["--torch_weights", str(notes), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "notes.txt as a torch weights file" in err[0]
    assert not (tmp_path / "o").exists()


def test_compare_with_weights_and_an_image_agrees(weights_file, tmp_path, capsys):
    pixels = np.random.default_rng(0).integers(0, 256, (260, 300, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", quality=90)
    compare.main(
        ["--width", "0.5", "--torch_weights", str(weights_file)]
        + ["--image", str(tmp_path / "photo.jpg"), "--json"]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["input"].endswith("photo.jpg")
    assert report["max_abs_diff_logits"] <= 1e-4 * max(1.0, report["max_abs_logit"])
    assert set(report["stages"]) == {
        "conv1",
        "maxpool",
        "stage2",
        "stage3",
        "stage4",
        "conv5",
        "fc",
    }
    assert report["same_top1"] and len(report["top5_jax"][0]) == 5


def test_compare_names_an_image_it_cannot_decode(tmp_path, capsys):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(SystemExit) as e:
        compare.main(["--width", "0.5", "--image", str(tmp_path / "broken.jpg")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "cannot decode the image of" in err and "broken.jpg" in err


def test_compare_runs_as_a_module_and_prints_json():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shufflenet_jax.interop.compare",
            "--width",
            "0.5",
            "--size",
            "64",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    assert report["max_abs_diff_logits"] <= 1e-4 * max(1.0, report["max_abs_logit"])
    assert all(
        d["max_abs_diff"] <= 1e-4 * max(1.0, d["max_abs_ref"]) for d in report["stages"].values()
    )


@pytest.mark.parametrize("source", ["--torch_weights", "--checkpoint"])
def test_eval_of_a_bad_model_source_is_one_line_naming_it(source, tmp_path):
    """eval.py given a text file as torchvision weights, or a checkpoint that does not exist:
    one line naming the path and the problem, exit status 1 (no traceback)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    path, message = {
        "--torch_weights": (notes, "notes.txt as a torch weights file"),
        "--checkpoint": (tmp_path / "nope", "nope does not exist"),
    }[source]
    out = subprocess.run(
        [sys.executable, "eval.py", "--config", "configs/digits.py", source, str(path)],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent,
    )  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and message in lines[0], out.stderr[-2000:]


@pytest.mark.parametrize(
    "main, old",
    [(convert.main, "--torch"), (compare.main, "--weights")],
    ids=["convert", "compare"],
)
def test_a_torchvision_files_old_option_name_still_works_and_says_it_is_deprecated(
    main, old, tmp_path, capsys
):
    """Every program names a torchvision file `--torch_weights`; convert's `--torch` and
    compare's `--weights` are kept for a release as aliases that print one deprecation line."""
    missing = str(tmp_path / "missing.pth")
    with pytest.raises(SystemExit):
        main(
            [old, missing, "--out", str(tmp_path / "o")] if main is convert.main else [old, missing]
        )
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"warning: {old} is deprecated and will be removed; use --torch_weights"
    assert err[-1].startswith("error: ") and "missing.pth" in err[-1]
