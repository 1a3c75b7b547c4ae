"""Helpers shared by the tests."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

# Limits on a train.py subprocess of the tests. They only end a hung run, so they sit far
# above what the runs take on the slowest CPU kind seen (2-vCPU AMD EPYC Zen 3, AVX2 only,
# under `pytest -n 2`, another test sharing the two cores; 2026-12-02): a whole test that
# starts train.py and stops it took at most 97 s, the two-process test with its two whole
# runs 189 s. The limits are 6x and 4.7x those.
START_LIMIT_S = 600  # until train.py has logged its first steps
RUN_LIMIT_S = 900  # until a train.py of a few steps (or one stopped by a signal) has exited


ROOT = Path(__file__).resolve().parent.parent  # the repository


def run_readme_command(*args: str, cwd=ROOT, data_dir: str | None = None, **kwargs):
    """One of README's commands (`python ...`) run as a user runs it, from `cwd`, TFDS reading
    `data_dir`: on the machine's own devices (one CPU device, not the tests' eight simulated)."""
    xla_flags = os.environ.get("XLA_FLAGS", "").split()
    own = [f for f in xla_flags if not f.startswith("--xla_force_host_platform_device_count")]
    env = {**os.environ, "XLA_FLAGS": " ".join(own)}
    if data_dir:
        env["TFDS_DATA_DIR"] = data_dir
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, **kwargs)  # fmt: skip


# Bound on any float64 quantity of a train-mode step (loss, gradients, updated parameters and
# running statistics) when two correct implementations compute it, relative to the largest
# value of its tensor. Float64 rounds at u = 1.1e-16; a random ShuffleNet's train-mode pass
# amplifies rounding by up to about 5e5 (`python benchmarks/float32_conditioning.py`, this
# fixture's width 0.5, batch 8, 64x64: PyTorch float32 2.9e-2 from float64, i.e. 4.9e5 x its
# u = 6e-8; Zen 3), so about 5e-11 in float64; 1e-9 leaves 18x for other CPUs' summation
# orders. Measured 1.5e-13 (gradients, JAX vs torch), 7.7e-14 (one SGD step's state), 1.2e-15
# (loss) and 4.8e-13 (gradients, fast vs reference formulations). A framework difference of
# 1e-6 (a gradient scaled by 1 + 1e-6) fails it.
FLOAT64_STEP_REL = 1e-9


def forward_products(model) -> int:
    """The matmuls one forward pass of `model` computes: its 1x1 convolutions and the fc."""
    from shufflenet_jax.model.layers import Conv2d

    convs = [m for _, m in nnx.iter_graph(model) if isinstance(m, Conv2d)]
    return sum(c.kind == "pointwise" for c in convs) + 1


def random_values(abstract, seed):
    """Random weights and BatchNorm statistics (positive variances) for an abstract model."""
    rng = np.random.default_rng(seed)
    values = nnx.to_pure_dict(nnx.state(abstract))

    def draw(path, leaf):
        x = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":  # He initialisation: fan-in is every axis but the last
            return x * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
        if name in ("scale", "var"):
            return 0.5 + np.abs(x)
        return 0.2 * x  # bias, mean

    return jax.tree_util.tree_map_with_path(draw, values)


def set_fields(config, **fields):
    """Sets each field in the config section that has it (field names are unique across
    sections), so tests can say `total_steps=6` without naming `train`."""
    for name, value in fields.items():
        sections = [s for s in config.values() if hasattr(s, "keys") and name in s]
        if len(sections) != 1:
            raise KeyError(f"no single config section has the field {name!r}")
        setattr(sections[0], name, value)
    return config


def count_independently(text):
    """Counts straight from the HLO text, outside fusion bodies: fusion instructions (single or
    tuple results), and library kernels (custom calls, and kCustom fusions that name a backend
    kind). A computation is a block from its header line (`name (...) -> ... {`) to `}`."""
    blocks = re.findall(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\n(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    fusion_line = re.compile(r"^\s*(?:ROOT )?%?\S+ = .*? fusion\(.*$", re.MULTILINE)
    bodies = {m for _, body in blocks for line in fusion_line.findall(body)
              for m in re.findall(r"calls=%?([\w.\-]+)", line)}  # fmt: skip
    fusions = [f for name, body in blocks if name not in bodies for f in fusion_line.findall(body)]
    custom = sum(
        len(re.findall(r"custom_call_target=", body)) for name, body in blocks if name not in bodies
    )
    custom += sum("kind=kCustom" in f and '"fusion_backend_config"' in f for f in fusions)
    return len(fusions), custom
