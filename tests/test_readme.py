"""README.md's Python example runs as written, and its commands name modules that exist."""

import re
import runpy
import sys
from pathlib import Path

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
