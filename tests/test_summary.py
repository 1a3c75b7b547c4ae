import json

import pytest

from shufflenet_jax.model import summary

# Multiply-adds at 224x224, computed analytically from the paper's Table 5 layout.
ANALYTIC_MACS = {0.5: 40.5e6, 1.0: 144.9e6, 1.5: 295.8e6, 2.0: 583.3e6}


@pytest.mark.parametrize("width", sorted(ANALYTIC_MACS))
def test_json_summary_has_torchvision_params_and_analytic_macs(width, capsys):
    summary.main(["--width", str(width), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert s["params"] == sum(layer["params"] for layer in s["layers"])
    assert s["macs"] == sum(layer["macs"] for layer in s["layers"])
    assert abs(s["macs"] - ANALYTIC_MACS[width]) <= 0.01 * ANALYTIC_MACS[width]
    # The official layout, which the paper counts, comes within 1.5% of Table 8 (41M for 0.5x).
    paper = s["paper_mflops"] * 1e6
    assert abs(s["official_layout_macs"] - paper) <= 0.015 * paper


def test_table_lists_layers_and_explains_the_paper_count(capsys):
    summary.main(["--width", "1.0"])
    out = capsys.readouterr().out
    assert "stage2.0.branch1.0" in out and "Conv2d 3x3 depthwise" in out
    assert "[-1, 7, 7, 1024]" in out
    assert "Total params: 2,278,604" in out
    assert "Total multiply-adds: 144,907,992 (144.9M)" in out
    assert "Paper relation" in out and "Table 8 gives 146M (-0.1%)" in out


def test_non_square_size_changes_spatial_shapes_only(capsys):
    summary.main(["--width", "0.5", "--size", "193x257", "--json"])
    s = json.loads(capsys.readouterr().out)
    assert s["input_size"] == [193, 257] and s["paper_mflops"] is None
    conv5 = next(layer for layer in s["layers"] if layer["name"] == "conv5.2")
    assert conv5["output_shape"] == [1, 7, 9, 1024]


@pytest.mark.parametrize("argv", [["--width", "3"], ["--size", "0"], ["--size", "12x"]])
def test_bad_arguments_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as e:
        summary.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
