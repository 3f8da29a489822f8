"""Shared pytest configuration: the `slow` marker is skipped unless --runslow is given."""

import os

import pytest

# The `tpu` test extra installs libtpu. jax would then load it in this CPU test process, which
# holds /tmp/libtpu_lockfile, and the TPU compile subprocesses (which need libtpu) fail with
# "Internal error when accessing libtpu multi-process lockfile". The tests run on CPU; the
# compile subprocesses reset JAX_PLATFORMS themselves where they need the TPU plugin.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (long sequences / big models)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop jax's compiled programs after every test module.

    Each compiled XLA:CPU executable holds ~18 memory mappings, and the whole suite in one process
    compiles thousands: past vm.max_map_count (65530) LLVM's next mmap fails and the process
    segfaults or aborts inside an XLA compile (seen at ~75 % of the suite). Tests in one module
    still share their compiled functions."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
