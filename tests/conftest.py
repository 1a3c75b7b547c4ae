"""Shared test setup: 8 simulated CPU devices (set before JAX starts) and small shared models."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Training tests (and their subprocesses) compile the same steps: share compilations on disk.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "shufflenet_jax_xla_cache")
)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A TFDS data_dir holding the prepared `digits` dataset (about a second to make)."""
    from shufflenet_jax import prepare

    data_dir = tmp_path_factory.mktemp("tfds")
    prepare.prepare("digits", data_dir=str(data_dir))
    return str(data_dir)
