"""Test-session settings.

Command-line entry points ask for one CPU device per core (`meta_train.devices`); a test
that calls one in-process before anything else ran JAX would switch the whole session to
several devices. One device for every in-process test keeps results independent of test
order; tests/test_devices.py runs the multi-device path in a subprocess.
"""

import os

import pytest

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Frees every module's compiled programs when it ends.

    XLA's CPU backend maps each compiled program's code into its own memory regions; a whole
    session's hundreds of compilations exceeded Linux's default limit of 65,530 mappings per
    process (`vm.max_map_count`; measured 64,152 before the crash), and the next compilation
    then aborted. Compilations are not shared between test modules, so nothing is lost.
    """
    yield
    import jax  # noqa: PLC0415 - after the device count is set above

    jax.clear_caches()
