"""shufflenet_jax.process: the program setup (malloc, flags, kernels) and its absence on import."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shufflenet_jax import process

# Runs a jitted function whose 132 MB temporary buffer XLA:CPU allocates per call, and reports
# the page faults of each later call against the buffer's size in pages.
_PROBE = """
import json, resource, sys
from shufflenet_jax.process import reuse_freed_host_memory
applied = reuse_freed_host_memory() if sys.argv[1] == "reuse" else None
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(jnp.cumsum(2.0 * x, axis=0)[::-1], axis=1).sum())
x = jnp.ones((4096, 4096), jnp.float32)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(25):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "temp_pages": temp / 4096, "faults": faults[5:]}))
"""


def _probe(setting: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, setting], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.os_level
def test_reused_host_memory_stops_per_call_page_faults():
    reuse, default = _probe("reuse"), _probe("default")
    assert reuse["applied"] is True  # the test machines run glibc
    assert reuse["temp_pages"] > 30_000
    # glibc's default maps the buffer afresh each call, so every page faults again.
    assert np.median(default["faults"]) > 0.9 * default["temp_pages"]
    # Reused, a typical call faults no page. Now and then (seen: one call in 20-30 on an AMD
    # EPYC, which made a mean over 5 calls fail) one call faults up to a buffer's pages once,
    # where the heap grows to hold the buffer elsewhere: the median and the total allow it.
    assert np.median(reuse["faults"]) < 0.02 * reuse["temp_pages"]
    assert sum(reuse["faults"]) < 0.25 * sum(default["faults"])


def test_process_setup_changes_malloc_only_when_the_cpu_is_the_default_backend(monkeypatch):
    from shufflenet_jax import process as hostmem

    def refuse():
        raise AssertionError("malloc changed for a non-CPU backend")

    monkeypatch.setattr(hostmem, "reuse_freed_host_memory", refuse)
    for platforms in ("cuda", "tpu", "cuda,cpu"):
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert not hostmem.cpu_is_default_backend()
        assert "not the CPU" in hostmem.setup_process()[0]
    calls = []
    monkeypatch.setattr(hostmem, "reuse_freed_host_memory", lambda: calls.append(1) or True)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert hostmem.cpu_is_default_backend()
    assert "kept for reuse" in hostmem.setup_process()[0] and calls == [1]


def test_process_setup_builds_the_kernels_before_the_processes_meet(monkeypatch):
    """A process still compiling the C++ kernels after the others had passed
    jax.distributed.initialize made them time out at the first collective (gloo waits 30 s;
    seen in CI's two-process test): the build comes before initialize's barrier."""
    import jax

    from shufflenet_jax import kernels, process

    order = []
    monkeypatch.setattr(process, "reuse_freed_host_memory", lambda: True)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setattr(kernels, "load", lambda: order.append("kernels") or True)
    monkeypatch.setattr(kernels, "status", lambda: "built")
    monkeypatch.setattr(jax.config, "update", lambda *a: None)  # gloo: for the real run
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a: order.append("initialize"))
    lines = process.setup_process("localhost:1", 2, 0)
    assert order == ["kernels", "initialize"]
    assert "C++ kernels: built" in lines
    assert "distributed: process 0 of 2 (via localhost:1)" in lines


def test_train_py_says_what_the_process_setup_did(tmp_path):
    """train.py logs the setting before anything else happens (here: a config that fails)."""
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/digits.py",
            "--workdir",
            str(tmp_path / "w"),
            "--config.data.data_dir",
            str(tmp_path / "nothing"),
            "--verbosity=1",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert out.stdout.startswith("host malloc: freed memory kept for reuse"), out.stdout
    quiet = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/digits.py", "--workdir",
         str(tmp_path / "w"), "--config.data.data_dir", str(tmp_path / "nothing")],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert "host malloc" not in quiet.stdout and "C++ kernels" not in quiet.stdout  # -v 1 only


@pytest.mark.parametrize("program", ["train.py", "eval.py"])
def test_a_config_path_that_names_no_file_is_one_line_naming_it(program, tmp_path):
    out = subprocess.run(
        [sys.executable, program, "--config", "configs/digit.py:1.0", "--workdir",
         str(tmp_path / "w")],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and lines == ["error: --config configs/digit.py: no such file"]
    assert not (tmp_path / "w").exists()


_IMPORT_ALL = """
import json, os, sys
env = dict(os.environ)
import jax
from absl import flags
names = ("jax_enable_x64", "jax_cpu_collectives_implementation")
config = {k: getattr(jax.config, k) for k in names}
import shufflenet_jax, shufflenet_jax.evaluation, shufflenet_jax.process
import shufflenet_jax.data.prepare, shufflenet_jax.interop.compare, shufflenet_jax.interop.convert
import shufflenet_jax.model.summary, shufflenet_jax.train.loop
from shufflenet_jax import kernels
from jax._src import xla_bridge
print(json.dumps({
    "env": dict(os.environ) == env,
    "config": config == {k: getattr(jax.config, k) for k in config},
    "flags_parsed": flags.FLAGS.is_parsed(),
    "backends": bool(xla_bridge._backends),
    "kernels_loaded": kernels.loaded(),
}))
"""


def test_importing_the_library_changes_no_process_state():
    """No environment, JAX config, absl flag parsing, backend start or C++ build on import:
    programs do all of that in `setup_process`."""
    out = subprocess.run(
        [sys.executable, "-c", _IMPORT_ALL], capture_output=True, text=True, check=True
    )
    state = json.loads(out.stdout.splitlines()[-1])
    assert state == {
        "env": True,
        "config": True,
        "flags_parsed": False,
        "backends": False,
        "kernels_loaded": False,
    }, state


def test_process_setup_builds_the_kernels_and_readies_the_flags_grain_workers_read():
    code = (
        "from absl import flags\n"
        "from shufflenet_jax import process\n"
        "from shufflenet_jax import kernels\n"
        "lines = process.setup_process()\n"
        "assert flags.FLAGS.is_parsed() and kernels.loaded()\n"
        "print(lines)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "C++ kernels: " in out.stdout and "-march=" in out.stdout, out.stdout


CLUSTER_VARIABLES = ("SLURM_", "OMPI_", "KUBERNETES_", "TPU_", "MEGASCALE_")


def test_a_cluster_environment_is_found_from_slurm_variables_and_none_without(monkeypatch):
    """What makes train.py and eval.py multi-process with no flags (JAX's own detectors; the
    two-process run from SLURM's variables is in test_training.py)."""
    for name in [n for n in os.environ if n.startswith(CLUSTER_VARIABLES)]:
        monkeypatch.delenv(name)
    assert process.cluster_environment() is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
             "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}  # fmt: skip
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    assert process.cluster_environment() == "SLURM"
    monkeypatch.delenv("SLURM_PROCID")  # a SLURM shell, not a task of a step: no cluster
    assert process.cluster_environment() is None
