"""Devices for meta-training: one CPU device per core, particles sharded across devices.

XLA's CPU runtime splits each kernel of one device over the cores it may use; for the
many small per-step kernels of an inner unroll that costs more in synchronisation than it
gains (measured with 2 cores, `python -m evaluate.measure.speed`: 5,100 inner steps per wall-second
on one device using 1.6 CPU-seconds per second, 8,600-9,900 with two devices each holding
half the pairs). So a run makes one CPU device per core and shards the estimator's pairs
across all devices of the backend it runs on (GPUs too); θ and the outer state are
replicated. With one device nothing changes.

Reductions over pairs then run per device and across devices, so a run's figures depend on
its device count within float rounding (a run is deterministic for a fixed count).
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import jax
from jax.sharding import NamedSharding, PartitionSpec

PAIRS_AXIS = "pairs"
T = TypeVar("T")


def use_cpu_cores(devices: int = 0) -> int:
    """Asks for one CPU device per core (or `devices`) before JAX starts its backends.

    Call it first thing in a command-line entry point. Once a backend is running the device
    count is fixed; this then changes nothing (tests, notebooks). The environment variable
    `JAX_NUM_CPU_DEVICES`, when set, wins (e.g. `JAX_NUM_CPU_DEVICES=1` for one device).

    Args:
      devices: CPU devices wanted; 0 means one per core this process may run on.

    Returns:
      The CPU device count asked for (or already in force).
    """
    if os.environ.get("JAX_NUM_CPU_DEVICES"):
        return jax.config.jax_num_cpu_devices
    want = devices or len(os.sched_getaffinity(0))
    try:
        jax.config.update("jax_num_cpu_devices", want)
    except RuntimeError:  # backends already initialised: keep what they have
        return jax.config.jax_num_cpu_devices
    return want


def serialize_collectives() -> bool:
    """Whether programs with cross-device collectives must run one at a time.

    XLA's CPU runtime runs programs without data dependencies at once on a shared thread
    pool; two such programs each waiting in an all-reduce for its other device's half can
    hold every thread (2 cores: 2 threads) and deadlock until the rendezvous times out
    (40 s, then the process aborts). Seen in long runs that switch templates, whose groups
    are separate programs (`meta_train.learner.grouped_estimate`).
    """
    return jax.default_backend() == "cpu" and jax.device_count() > 1


def wait_if_collectives(out: T) -> T:
    """`out` once it is computed, where `serialize_collectives` says programs with
    collectives must not overlap; `out` at once elsewhere.

    Every step of a run goes through this (`meta_train.build.Run.outer_step` and
    `Run.estimate`), so no caller can queue a program with an all-reduce behind another one
    still running: a loop of outer steps dispatched without a sync aborted 4 runs of 4 on 2
    CPU devices (`python -m evaluate.measure.server_speed --ways in_process_all`, XLA's
    all-reduce rendezvous timing out after 40 s) before it did. The wait costs the overlap
    of one step's host-side dispatch with the previous step's compute, a few ms per outer
    step of 100s of ms.

    Args:
      out: a pytree of arrays just returned by a jitted call.

    Returns:
      `out`, unchanged.
    """
    if serialize_collectives():
        jax.block_until_ready(out)
    return out


def pair_sharding(num_pairs: int) -> tuple[NamedSharding, NamedSharding] | None:
    """(sharded over pairs, replicated) shardings over all default devices, or None when
    one device holds everything (one device, or pairs not divisible by the device count)."""
    devices = jax.devices()
    if len(devices) < 2 or num_pairs % len(devices):
        return None
    mesh = jax.sharding.Mesh(devices, (PAIRS_AXIS,))
    return NamedSharding(mesh, PartitionSpec(PAIRS_AXIS)), NamedSharding(mesh, PartitionSpec())


def learner_shardings(state: Any, pairs_per_group: int) -> Any:
    """Where each array of a learner state goes: the estimator state's pair axis across
    devices, everything else replicated; all on the first device when `pair_sharding`
    gives None.

    Args:
      state: a `LearnerState` of arrays or of `jax.ShapeDtypeStruct`s.
      pairs_per_group: the leading (pair) axis length of every estimator-state array.

    Returns:
      A tree of shardings with the structure of `state`.
    """
    shardings = pair_sharding(pairs_per_group)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: one, state)
    rest = jax.tree.map(lambda _: shardings[1], state.replace(est_state=()))
    return rest.replace(est_state=estimator_shardings(state.est_state, pairs_per_group))


def estimator_shardings(est_state: Any, pairs_per_group: int) -> Any:
    """`learner_shardings` of an estimator state (all groups or one group's)."""
    shardings = pair_sharding(pairs_per_group)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: one, est_state)
    split, replicated = shardings

    def along_pairs(x):
        return split if len(x.shape) >= 1 and x.shape[0] == pairs_per_group else replicated

    return jax.tree.map(along_pairs, est_state)


def shard_learner_state(state: Any, pairs_per_group: int) -> Any:
    """The learner state placed as `learner_shardings` says."""
    return jax.device_put(state, learner_shardings(state, pairs_per_group))


def with_shardings(abstract: Any, pairs_per_group: int) -> Any:
    """`jax.ShapeDtypeStruct`s that carry `learner_shardings`: restore targets, so a
    checkpoint saved with another device count restores onto this process's devices."""
    shardings = learner_shardings(abstract, pairs_per_group)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
    )
