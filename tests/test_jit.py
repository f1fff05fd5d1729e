"""Tests of meta_train/jit.py: the persistent compilation cache of the command-line tools."""

import os
from pathlib import Path

import pytest
from test_devices import run_json_script

ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")

# Compiles one program in a fresh process with the cache as the environment sets it; prints
# the folder in use, the cache hits and what the folder holds after.
SCRIPT = """
import json, os
import jax, jax.numpy as jnp
from meta_train.jit import use_compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda name, **kw: hits.append(name) if name.endswith("/cache_hits") else None)
folder = use_compile_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.jit(lambda x: jnp.tanh(x) @ x.T + 1.0)(jnp.ones((8, 8))).block_until_ready()
entries = sorted(os.listdir(folder)) if folder and os.path.isdir(folder) else []
print(json.dumps({"folder": folder and str(folder), "hits": len(hits), "entries": entries}))
"""


def _run(env_overrides: dict[str, str], home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOPT_", "JAX_COMP"))}
    env.update(HOME=str(home), JAX_PLATFORMS="cpu", **env_overrides)
    return run_json_script(SCRIPT, [], env)


def test_a_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
    folder = tmp_path / "cache"
    first = _run({"LOPT_COMPILE_CACHE": str(folder)}, tmp_path)
    assert first["folder"] == str(folder) and first["hits"] == 0 and first["entries"]
    second = _run({"LOPT_COMPILE_CACHE": str(folder)}, tmp_path)
    assert second["hits"] >= 1  # loaded, not compiled
    assert second["entries"] == first["entries"]  # nothing new written


def test_the_cache_can_be_turned_off(tmp_path):
    got = _run({"LOPT_COMPILE_CACHE": "off"}, tmp_path)
    assert got["folder"] is None and got["hits"] == 0
    assert not (tmp_path / ".cache").exists()  # nothing written under the home folder


@pytest.fixture
def no_cache_set(monkeypatch):
    """The folder choice in this process; jax's setting is restored after."""
    import jax  # noqa: PLC0415

    for var in ("LOPT_COMPILE_CACHE", "LOPT_CACHE_DIR", *ENV):
        monkeypatch.delenv(var, raising=False)
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    jax.config.update("jax_compilation_cache_dir", None)
    yield monkeypatch
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_compilation_cache_max_size", before[1])


def test_the_folder_follows_the_environment(tmp_path, no_cache_set, capsys):
    import jax  # noqa: PLC0415

    from meta_train.jit import COMPILE_CACHE_MAX_BYTES, use_compile_cache  # noqa: PLC0415

    no_cache_set.setenv("HOME", str(tmp_path))
    assert use_compile_cache() == tmp_path / ".cache" / "lopt" / "jax"
    assert jax.config.jax_compilation_cache_max_size == COMPILE_CACHE_MAX_BYTES
    # ... and the processes it starts inherit the same setting.
    assert [os.environ[v] for v in ENV] == [
        str(tmp_path / ".cache" / "lopt" / "jax"),
        str(COMPILE_CACHE_MAX_BYTES),
    ]
    jax.config.update("jax_compilation_cache_dir", None)
    no_cache_set.setenv("LOPT_CACHE_DIR", str(tmp_path / "root"))
    assert use_compile_cache() == tmp_path / "root" / "jax"
    jax.config.update("jax_compilation_cache_dir", None)
    for off in ("0", "OFF", "false"):
        for var in ENV:
            no_cache_set.delenv(var, raising=False)
        no_cache_set.setenv("LOPT_COMPILE_CACHE", off)
        assert use_compile_cache() is None and jax.config.jax_compilation_cache_dir is None
        assert not any(var in os.environ for var in ENV)
    no_cache_set.setenv("LOPT_COMPILE_CACHE", "~/x")
    assert use_compile_cache() == tmp_path / "x" and (tmp_path / "x").is_dir()
    jax.config.update("jax_compilation_cache_dir", None)
    # A folder that cannot be made: one note, no cache (JAX would warn at every compile).
    (tmp_path / "file").write_text("")
    no_cache_set.setenv("LOPT_COMPILE_CACHE", str(tmp_path / "file" / "jax"))
    assert use_compile_cache() is None and jax.config.jax_compilation_cache_dir is None
    assert "compiled programs are not cached" in capsys.readouterr().err
    # A folder set through JAX itself stays in use, whatever LOPT_COMPILE_CACHE says.
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "own"))
    no_cache_set.setenv("LOPT_COMPILE_CACHE", "off")
    assert use_compile_cache() == tmp_path / "own"
