import json

import pytest

from shufflenet_jax.model import summary

# The paper's Table 5: output channels of conv1, stages 2-4 and conv5 for each width.
TABLE_5 = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
REPEATS = (4, 8, 4)  # units in stages 2, 3, 4 (Table 5)
TABLE_8_MFLOPS = {0.5: 41, 1.0: 146, 1.5: 299, 2.0: 591}  # the paper's complexity column


def closed_form_macs(width: float, official: bool = False) -> int:
    """Multiply-adds of the network at 224x224 with 1000 classes (the paper's setting)."""
    return closed_form_macs_at(width, 224, 1000, official)


def closed_form_macs_at(width: float, size: int, num_classes: int, official: bool = False) -> int:
    """Multiply-adds of the network on size x size images, from Table 5 alone.

    A k x k convolution from a to b channels at an h x h output costs h*h*k*k*a*b (a depthwise
    one h*h*k*k*a); each stride-2 3x3 (pad 1) step maps n to (n - 1) // 2 + 1. Each stage's
    first unit (stride 2) has a projection branch (3x3 depthwise, 1x1) and a main branch (1x1
    at the input's size, 3x3 depthwise stride 2, 1x1); the others split the channels and
    transform half (1x1, 3x3 depthwise, 1x1). torchvision's first unit gives each branch out/2
    channels; the official (megvii) layout, which the paper counts, projects in -> in and lets
    the main branch give out - in.
    """
    c1, *stages, c5 = TABLE_5[width]
    down = lambda n: (n - 1) // 2 + 1  # noqa: E731
    size = down(size)  # conv1: 3x3 stride 2
    total = size * size * 9 * 3 * c1
    size, cin = down(size), c1  # max-pool 3x3 stride 2
    for cout, repeats in zip(stages, REPEATS, strict=True):
        half, out = cout // 2, down(size)
        proj, main = (cin, cout - cin) if official else (half, half)
        total += out * out * (9 * cin + cin * proj)  # projection branch
        total += size * size * cin * half + out * out * (9 * half + half * main)  # main branch
        total += (repeats - 1) * out * out * (2 * half * half + 9 * half)  # stride-1 units
        size, cin = out, cout
    return total + size * size * cin * c5 + c5 * num_classes  # conv5 (1x1), fc


def closed_form_params(width: float) -> int:
    """Trainable parameters of torchvision's layout from Table 5: convolutions without bias,
    each followed by a BatchNorm (scale and bias per channel), and the fc layer with its bias."""
    c1, *stages, c5 = TABLE_5[width]

    def conv_bn(a, b, depthwise=False, k=1):
        return k * k * (a if depthwise else a * b) + 2 * b

    total, cin = conv_bn(3, c1, k=3), c1
    for cout, repeats in zip(stages, REPEATS, strict=True):
        half = cout // 2
        total += conv_bn(cin, cin, True, 3) + conv_bn(cin, half)  # projection branch
        total += conv_bn(cin, half) + conv_bn(half, half, True, 3) + conv_bn(half, half)
        total += (repeats - 1) * (2 * conv_bn(half, half) + conv_bn(half, half, True, 3))
        cin = cout
    return total + conv_bn(cin, c5) + c5 * 1000 + 1000


@pytest.mark.parametrize("width", sorted(TABLE_5))
def test_json_summary_has_the_closed_form_params_and_macs(width, capsys):
    summary.main(["--width", str(width), "--json"])
    s = json.loads(capsys.readouterr().out)
    assert s["params"] == closed_form_params(width)
    assert s["macs"] == closed_form_macs(width)
    assert s["official_layout_macs"] == closed_form_macs(width, official=True)
    # The official layout, which the paper counts, comes within 1.5% of Table 8 (41M for 0.5x;
    # the paper rounds to 1M and does not say what else it counts).
    paper = TABLE_8_MFLOPS[width] * 1e6
    assert s["paper_mflops"] == TABLE_8_MFLOPS[width]
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
