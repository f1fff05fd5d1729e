"""`jax.jit` with the XLA compiler options measured fastest for this project's programs.

On the CPU, XLA's default LLVM optimisation level spends about twice the compile time of
level 1 on the outer step and produces slower code for its many small, narrow kernels
(measured on the speed benchmark's reference configuration, one core, in one process:
compile 11.1 s -> 6.5 s, inner steps per second +9 %; `python -m evaluate.measure.speed` prints
both). Other backends
keep XLA's defaults. The backend is looked up at the first call, not at import, so a
process can still pin its cores before XLA starts.

`use_compile_cache` keeps compiled programs on disk between the command-line tools' runs.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from tasks.caches import cache_dir

CPU_COMPILER_OPTIONS = {
    "xla_backend_optimization_level": 1,
    # One device's kernels stay on its thread; with one device per core
    # (`meta_train.devices`) the cores are used by the devices, not inside each kernel.
    "xla_cpu_multi_thread_eigen": False,
    # XLA's concurrency-optimised scheduler: no faster here and 0.4 s longer to compile.
    "xla_cpu_enable_concurrency_optimized_scheduler": False,
}


class _BackendJit:
    """A jitted function whose compiler options depend on the backend it runs on."""

    def __init__(self, fun: Callable, cpu_options: dict[str, Any], jit_kwargs: dict[str, Any]):
        functools.update_wrapper(self, fun)
        self._fun, self._jit_kwargs, self._by_backend = fun, jit_kwargs, {}
        self._cpu_options = {**CPU_COMPILER_OPTIONS, **cpu_options}

    def _jitted(self, nested: bool = False):
        # Inside another trace (eval_shape, an enclosing jit) the function is inlined into
        # the outer program, and jax accepts compiler options only at the top level.
        backend = "nested" if nested else jax.default_backend()
        if backend not in self._by_backend:
            options = self._cpu_options if backend == "cpu" else None
            self._by_backend[backend] = jax.jit(
                self._fun, compiler_options=options, **self._jit_kwargs
            )
        return self._by_backend[backend]

    def __call__(self, *args, **kwargs):
        nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((args, kwargs)))
        return self._jitted(nested)(*args, **kwargs)

    def __getattr__(self, name: str):
        # trace, lower, _cache_size, ... of the underlying jitted function.
        return getattr(self._jitted(), name)


def jit(
    fun: Callable | None = None, *, cpu_options: dict[str, Any] | None = None, **jit_kwargs: Any
):
    """Like `jax.jit` (same keyword arguments), with `CPU_COMPILER_OPTIONS` on the CPU.

    Usable as `@jit` or `@jit(static_argnames=..., donate_argnames=...)`.

    Args:
      fun: the function.
      cpu_options: more XLA options for the CPU, over `CPU_COMPILER_OPTIONS` (the
        benchmark's training loops add `lopt.xla_options.CPU_OPTIONS`).
      **jit_kwargs: `jax.jit`'s keyword arguments.
    """
    if fun is None:
        return functools.partial(jit, cpu_options=cpu_options, **jit_kwargs)
    return _BackendJit(fun, cpu_options or {}, jit_kwargs)


COMPILE_CACHE_ENV = "LOPT_COMPILE_CACHE"
COMPILE_CACHE_MAX_BYTES = 2**30
_OFF = {"0", "off", "false", "no", "none"}


def use_compile_cache() -> Path | None:
    """Turns on JAX's persistent compilation cache for this process, so a rerun, a resume
    or another command on programs of the same shapes loads XLA's compiled code from disk
    instead of compiling it again (the default job's first 500 outer steps: 49-55 s cold,
    22 s warm; docs/speed.md, "Meta-training").

    The folder is `$LOPT_COMPILE_CACHE`, else `$LOPT_CACHE_DIR/jax`, else
    `~/.cache/lopt/jax`; `LOPT_COMPILE_CACHE=off` turns it off. A folder set through JAX
    itself (`JAX_COMPILATION_CACHE_DIR`) is left in use. The cache keeps its least recently
    used entries under `COMPILE_CACHE_MAX_BYTES`. The setting also goes into the environment,
    so the processes the command starts use the same cache. Entries are keyed by the program, the
    compiler options and the jax/jaxlib versions, so a stale entry is never loaded. Call it
    before the first compilation; the command-line entry points do (`meta_train.cli`).

    Returns:
      The cache folder in use, or None when it is off (or the folder cannot be written: a
      one-line note on stderr says so).
    """
    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    setting = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if setting.lower() in _OFF:
        return None
    if setting:
        folder = Path(setting).expanduser()
    else:
        folder = cache_dir("jax")
    try:  # JAX would warn at every compilation instead: one line here, and the run goes on
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        print(
            f"note: compiled programs are not cached ({folder} is not a writable folder; "
            f"set {COMPILE_CACHE_ENV} to one, or to 'off')",
            file=sys.stderr,
        )
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    # The command's own processes (the benchmark's spawned workers, the gradient server's
    # Ray workers) read JAX's settings from the environment they inherit.
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder)
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(COMPILE_CACHE_MAX_BYTES)
    return folder
