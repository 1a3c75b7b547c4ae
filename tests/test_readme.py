"""README.md's Python example runs as written, and its commands name modules that exist."""

import os
import re
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_python_example_runs():
    (block,) = re.findall(r"```python\n(.*?)```", README, re.S)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)  # noqa: S102  (our own README)
    assert scope["logits"].shape == (8, 1000)
    assert set(scope["stages"]) == {"conv1", "maxpool", "stage2", "stage3", "stage4", "conv5", "fc"}


MODULES = sorted(set(re.findall(r"python -m ([\w.]+)", README)) - {"pytest"})


@pytest.mark.parametrize("module", MODULES)
def test_readme_modules_have_a_command_line(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__")
    assert exit_.value.code == 0
    assert "usage" in capsys.readouterr().out.lower()


def test_the_kernels_command_builds_all_of_the_packages_cpp():
    """README: `python -m shufflenet_jax.kernels` builds the network's kernels and the input's
    JPEG decoder and resize (cached: a second build is a lookup)."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "shufflenet_jax.kernels"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout + out.stderr
    assert lines[0].startswith("C++ kernels: ") and ".so" in lines[0]
    assert lines[1:] == ["C++ JPEG decoder: built", "C++ resize: built"]


# README's Python example at a small width and size: the default kernel family ("cpp", built on
# first use), predict a random batch (saved to the path given)
RUN_EXAMPLE = """
import sys
import jax, numpy as np
from flax import nnx
from shufflenet_jax import ShuffleNetV2, predictor
model = ShuffleNetV2(width=0.5, num_classes=10, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
np.save(sys.argv[1], np.asarray(predictor(model)(x)))
"""


def test_without_a_compiler_the_example_warns_once_and_computes_the_same_with_xla(tmp_path):
    """README: "without a compiler ... a warning says so and XLA's formulations ... run
    instead". The example (small) run with $CXX naming no compiler and an empty kernel cache:
    exit 0, one warning naming the compiler, and the logits of the run with the kernels
    (float32 formulations of the same layers: 1e-4 of the logits' scale, as in test_models)."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    runs = {}
    no_compiler = {"CXX": str(tmp_path / "no-g++"), "SHUFFLENET_JAX_CACHE": str(tmp_path / "c")}
    for name, env in [("kernels", {}), ("xla", no_compiler)]:
        done = subprocess.run([sys.executable, "-c", RUN_EXAMPLE, str(tmp_path / f"{name}.npy")],
                              cwd=root, env={**os.environ, **env}, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = done.stderr
    warnings = [line for line in runs["xla"].splitlines() if "C++ kernels unavailable" in line]
    assert len(warnings) == 1 and "no-g++" in warnings[0], runs["xla"][-2000:]
    assert "C++ kernels unavailable" not in runs["kernels"]
    assert not list((tmp_path / "c").glob("kernels-*.so"))  # nothing was built
    want, got = np.load(tmp_path / "kernels.npy"), np.load(tmp_path / "xla.npy")
    assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want)))
