"""`jax.jit` with the XLA compiler options measured fastest for this project's programs.

On the CPU, XLA's default LLVM optimisation level spends about twice the compile time of
level 1 on the outer step and produces slower code for its many small, narrow kernels
(measured on the speed benchmark's reference configuration, one core, in one process:
compile 11.1 s -> 6.5 s, inner steps per second +9 %; `python -m evaluate.measure.speed` prints
both). Other backends
keep XLA's defaults. The backend is looked up at the first call, not at import, so a
process can still pin its cores before XLA starts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

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
