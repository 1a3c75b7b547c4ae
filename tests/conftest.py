"""Shared test setup: 8 simulated CPU devices (set before JAX starts) and small shared models."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Training tests (and their subprocesses) compile the same steps: share compilations on disk.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "shufflenet_jax_xla_cache")
)


import importlib.util  # noqa: E402

import chex  # noqa: E402
import pytest  # noqa: E402

# 8 simulated CPU devices, chex's way (XLA_FLAGS, other flags kept; subprocesses inherit it)
chex.set_n_cpu_devices(8)

# Triton (which torch._dynamo imports on first use, e.g. inside torch.load) segfaults when
# imported after TensorFlow 2.21 (`import tensorflow; import torch._dynamo` exits 139 here;
# in the other order both work), and which of a worker's tests imports which first depends
# on how the tests are shared out: import it first.
if importlib.util.find_spec("torch") is not None:
    import torch._dynamo  # noqa: E402, F401


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A TFDS data_dir holding the prepared `digits` dataset (about a second to make)."""
    from shufflenet_jax.data import prepare

    data_dir = tmp_path_factory.mktemp("tfds")
    prepare.prepare("digits", data_dir=str(data_dir))
    return str(data_dir)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, worker_id):
    """README's quickstart as a user runs it, from a folder of its own: `python -m
    shufflenet_jax.data.prepare digits`, then `python train.py --config configs/digits.py
    --workdir runs/digits` (1,500 steps; about 3 minutes on a 2-vCPU Zen 3 beside another
    test). Made once per test run: the first worker to ask makes it under a lock, the others
    read it. (folder, its TFDS data_dir, the run's workdir, train.py's output)"""
    import fcntl
    import json

    from .helpers import ROOT, run_readme_command

    root = tmp_path_factory.getbasetemp()
    root = root if worker_id == "master" else root.parent  # one run's workers share its parent
    folder, data_dir = root / "quickstart", root / "quickstart" / "tensorflow_datasets"
    with open(root / "quickstart.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        record = root / "quickstart.json"
        if not record.exists():
            folder.mkdir(exist_ok=True)
            train, config = str(ROOT / "train.py"), str(ROOT / "configs" / "digits.py")
            steps = [("-m", "shufflenet_jax.data.prepare", "digits"),
                     (train, "--config", config, "--workdir", "runs/digits")]  # fmt: skip
            outputs = []
            for args in steps:
                done = run_readme_command(*args, cwd=str(folder), data_dir=str(data_dir))
                outputs.append(done.stdout + done.stderr)
                if done.returncode != 0:
                    break
            record.write_text(json.dumps({"returncode": done.returncode, "outputs": outputs}))
        made = json.loads(record.read_text())
    assert made["returncode"] == 0, made["outputs"][-1][-3000:]
    return folder, str(data_dir), folder / "runs" / "digits", made["outputs"][-1]


# Test modules that import torch at the top; their tests are all marked `torch`. A run that
# deselects those (`-m "not torch"`, the leg without torch) does not import them either.
TORCH_MODULES = ("test_convert.py", "test_convert_cli.py")


def pytest_ignore_collect(collection_path, config):
    deselects_torch = "not torch" in (config.option.markexpr or "")
    return True if deselects_torch and collection_path.name in TORCH_MODULES else None


def pytest_collection_modifyitems(items):
    """Hand out the long compile, training and evaluation tests first, so that with `-n 2` the two
    workers do not end with one of them running a long test alone."""
    first = ["test_aot.py", "test_training.py", "test_evaluation.py"]
    name = lambda item: item.nodeid.split("::")[0].rsplit("/", 1)[-1]  # noqa: E731

    def order(item):
        # xdist hands the first tests out one at a time, in turn: one test that makes the
        # quickstart's run goes first, the others that use it last, when the run is made,
        # instead of a second worker waiting on its lock
        if "quickstart_run" in getattr(item, "fixturenames", ()):
            return -1 if item.name.startswith("test_the_quickstart_reaches") else len(first) + 1
        return first.index(name(item)) if name(item) in first else len(first)

    items.sort(key=order)
