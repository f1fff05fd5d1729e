"""Test-session settings.

Command-line entry points ask for one CPU device per core (`meta_train.devices`); a test
that calls one in-process before anything else ran JAX would switch the whole session to
several devices. One device for every in-process test keeps results independent of test
order; tests/test_devices.py runs the multi-device path in a subprocess.

The session's compiled programs go to a fresh persistent compilation cache that the
session's subprocesses share, and that is deleted at the end: tests that build the same
programs in another module or another process load them instead of compiling again (the
default suite ran in 552 s with it against 585 s without, one after the other). Nothing is
read from or written to the user's own cache (`meta_train.jit.use_compile_cache`).
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _cache = tempfile.mkdtemp(prefix="lopt-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)


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


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """wandb with no credentials, no real home and a dead server address, in case anything
    tried to reach one; wandb's variables are restored afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    for var in [v for v in os.environ if v.startswith("WANDB_") and v != "WANDB_SERVICE"]:
        monkeypatch.delenv(var)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)  # undo restores what RunLogger sets
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / "netrc"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    import meta_train.logging as mlog  # noqa: PLC0415 - after the device count is set

    monkeypatch.setattr(mlog, "_ENV_SET_HERE", {})
    return home
