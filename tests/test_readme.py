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
