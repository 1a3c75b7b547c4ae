"""The fusion lab (lab.fusion) and the guideline experiments' FLOP balance."""

import json
import re
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lab import fusion, guidelines, variants
from shufflenet_jax.model.network import abstract_model

from .helpers import count_independently


@pytest.mark.parametrize("groups,channels", [(2, 116), (3, 24), (4, 8), (1, 6)])
def test_every_shuffle_implementation_computes_the_same_permutation(groups, channels):
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, channels))
    expected = np.asarray(x).reshape(2, 3, 5, groups, -1).transpose(0, 1, 2, 4, 3).reshape(x.shape)
    for name, impl in variants.SHUFFLE.items():
        np.testing.assert_array_equal(np.asarray(impl(x, groups)), expected, err_msg=name)


def test_network_shuffle_variants_give_the_same_outputs():
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    outputs = {}
    for shuffle in fusion.SHUFFLES:
        model = fusion._random_model(
            abstract_model(0.5, 10, impl=variants.named_impl(shuffle=shuffle)), seed=3
        )
        f, params, stats = fusion._as_pure(model, "forward", None)
        outputs[shuffle] = np.asarray(jax.jit(f)(params, stats, x))
    for shuffle in fusion.SHUFFLES[1:]:
        np.testing.assert_allclose(outputs[shuffle], outputs["transpose"], rtol=1e-5, atol=1e-5)


def test_unit_shuffle_variants_give_the_same_train_mode_gradients():
    """In float64: train-mode gradients of a random unit are too ill-conditioned to compare
    float32 runs whose only difference is XLA's order of operations."""
    grads = {}
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(4), (2, 8, 8, 58), jnp.float64)
        for shuffle in fusion.SHUFFLES:
            f, params, stats = fusion.unit_case(58, shuffle, "shifted", "train")
            to64 = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), t)  # noqa: E731
            grads[shuffle] = jax.tree.leaves(jax.jit(f)(to64(params), to64(stats), x))
    for shuffle in fusion.SHUFFLES[1:]:
        for a, b in zip(grads[shuffle], grads["transpose"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_folded_shuffle_in_a_unit_pair_computes_the_same_function():
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 116))
    outputs = {}
    for shuffle in ("transpose", "folded"):
        f, params, stats = fusion.pair_case(116, shuffle, "shifted", "forward")
        outputs[shuffle] = np.asarray(jax.jit(f)(params, stats, x))
    np.testing.assert_allclose(outputs["folded"], outputs["transpose"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("target", ["unit", "net"])
def test_fusion_report_counts_agree_with_the_hlo_text(target, tmp_path):
    if target == "unit":
        f, params, stats = fusion.unit_case(58, "transpose", "shifted", "train")
        x = jnp.ones((2, 14, 14, 58))
    else:
        f, params, stats = fusion.net_case(0.5, "transpose", "shifted", "forward")
        x = jnp.ones((2, 64, 64, 3))
    report = fusion.analyze(f, params, stats, x, repeats=1, save_hlo=tmp_path / "hlo.txt")
    fusions, library = count_independently((tmp_path / "hlo.txt").read_text())
    assert sum(report.fusions.values()) == fusions > 0
    assert sum(report.library_calls.values()) == library
    assert report.launches >= fusions
    assert report.flops > 0 and report.bytes_accessed > 0 and report.seconds > 0
    assert report.hbm_bytes > x.size * 4  # the kernels read the input at least once
    assert report.unfused.get("transpose", 0) == 0  # the shuffle's transpose is fused


def test_separately_compiled_bn_and_relu_compute_the_same_with_more_memory_traffic():
    reports, outputs = {}, {}
    x = jax.random.normal(jax.random.key(5), (2, 8, 8, 32))
    for variant in ("fused", "separate"):
        f, params, stats = fusion.block_case(32, variant, "forward")
        reports[variant] = fusion.analyze(f, params, stats, x, repeats=1)
        stages = f if isinstance(f, list) else [f]
        y = x
        for stage in stages:
            y = jax.jit(stage)(params, stats, y)
        outputs[variant] = np.asarray(y)
    np.testing.assert_allclose(outputs["separate"], outputs["fused"], rtol=1e-6, atol=1e-6)
    assert sum(reports["separate"].fusions.values()) > sum(reports["fused"].fusions.values())
    assert reports["separate"].bytes_accessed > reports["fused"].bytes_accessed


def test_fusion_cli_documents_itself_and_writes_json(tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "lab.fusion", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--subject" in help_text and "--target" in help_text and "--save-hlo" in help_text
    out = tmp_path / "block.json"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lab.fusion",
            "--subject",
            "block",
            "--channels",
            "16",
            "--size",
            "8",
            "--batch",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["bn_relu=fused", "bn_relu=separate"]


def test_readmes_pair_command_shows_which_fusion_holds_the_concat_and_saves_each_hlo(tmp_path):
    """README's `lab.fusion --subject pair --compare shuffle --evidence --save-hlo DIR` (small
    shapes): a row per shuffle variant; --save-hlo writes each variant's optimized HLO, whose
    fusions number what its row says; --evidence lists, under each row, the fusions that hold
    a concatenate, transpose or gather and the library fusions, as its JSON row records them
    (whichever XLA makes of the concat; nothing of the kind is printed without the flag)."""
    args = [sys.executable, "-m", "lab.fusion", "--subject", "pair", "--compare", "shuffle",
            "--channels", "16", "--size", "8", "--batch", "2", "--repeats", "1"]  # fmt: skip
    hlo_dir, out = tmp_path / "hlo", tmp_path / "pair.json"
    shown = subprocess.run([*args, "--evidence", "--save-hlo", str(hlo_dir), "--json", str(out)],
                           capture_output=True, text=True, check=True).stdout  # fmt: skip
    plain = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rows = json.loads(out.read_text())["rows"]
    variants = [r["variant"].split(",")[0] for r in rows]
    assert variants == [f"shuffle={v}" for v in ("transpose", "stack", "gather", "folded")]
    for row in rows:
        (saved,) = hlo_dir.glob(f"*_{row['variant'].replace(',', '_')}.txt")
        assert count_independently(saved.read_text())[0] == row["fusions"], row["variant"]
        block = shown.split(row["variant"], 1)[1].split("shuffle=", 1)[0]
        held = re.findall(r"^    a fusion holding (\{.*\})$", block, re.M)
        library = re.findall(r"^    a library fusion holding (\{.*\})$", block, re.M)
        assert held == [str(dict(sorted(b.items()))) for b in row["data_movement_fusions"]]
        assert library == [str(dict(sorted(b.items()))) for b in row["library_fusions"]]
        assert held or library, row["variant"]
    assert "fusion holding" not in plain


# The paper's own channel choices balance FLOPs to within these fractions (Table 1: 128*128*2 is
# 5.35% above 36*432*2); G4's rows share the same convolutions exactly.
TOLERANCE = {"G1": 0.054, "G2": 0.012, "G3": 0.011, "G4": 0.0}


@pytest.mark.parametrize("table", ["G1", "G2", "G3", "G4"])
def test_guideline_rows_hold_flops_equal(table):
    ((title, rows),) = [(t, r) for t, r in guidelines.tables().items() if t.startswith(table)]
    macs = [row.macs_per_image for row in rows]
    assert max(macs) / min(macs) - 1 <= TOLERANCE[table]
    # XLA agrees: 2 flops per multiply-accumulate, plus the element-wise ops (ReLU, shortcut
    # add: up to 1.9% more in G4, the table about them)
    for row in rows:
        fn, args = row.build(1)
        flops = jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]
        assert 2 * row.macs_per_image <= flops <= 2 * row.macs_per_image * 1.02, row.label


def test_timings_come_with_their_spread(monkeypatch):
    """The lab's times are a median and the runs' interquartile range over it, so that two
    programs whose times differ within this machine's noise are not read as different."""
    ticks = iter([0, 1, 1, 3, 3, 4, 4, 8, 8, 10])  # runs of 1, 2, 1, 4 and 2 seconds
    monkeypatch.setattr(fusion.time, "perf_counter", lambda: next(ticks))
    median, spread = fusion._median_seconds(lambda: None, 5)
    q1, _, q3 = statistics.quantiles([1, 2, 1, 4, 2], n=4)
    assert median == 2 and spread == pytest.approx((q3 - q1) / 2) and spread > 0
    assert fusion._median_seconds(lambda: None, 0) == (None, None)


def test_the_old_option_names_still_work_and_say_they_are_deprecated(tmp_path):
    """`--target` names the machine compiled for in every program (`aot.targets`); lab.fusion's
    `--platform` (that machine) and `--target unit` (the subject) are kept for a release."""
    args = [sys.executable, "-m", "lab.fusion", "--target", "block", "--platform", "local",
            "--channels", "16", "--size", "8", "--batch", "2", "--repeats", "0"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "warning: --platform is deprecated and will be removed; use --target" in done.stderr
    assert "warning: --target block is deprecated; use --subject block" in done.stdout
    assert "block forward float32 for local" in done.stdout
