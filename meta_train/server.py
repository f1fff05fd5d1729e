"""The gradient server: an outer learner fed by gradient workers, in this process or on Ray.

The learner owns θ, the outer optimizer state, the outer-step counter, checkpoints and
logging (`meta_train.main`); each `GradientWorker` owns its particles and estimator state
and returns meta-gradient estimates tagged with the θ version they used. One outer step:

1. the learner publishes θ as version v (= outer steps done): once into Ray's object
   store, whatever the number of workers;
2. idle workers start an estimate of the newest θ (with `queue_depth=2`, async only, every
   worker keeps a second one queued behind it, so it never waits for the learner); a worker
   only ever sends back the flat meta-gradient, its window's metrics and its timing, never
   particles;
3. the learner takes estimates as they finish: in 'sync' mode one from every worker, all of
   version v; in 'async' mode the first `meta_batch` whose staleness (v minus their
   version) is at most `max_staleness`, dropping (and counting) older ones, while workers
   that finished start again at once on the newest θ;
4. it averages them and applies the outer optimizer (`meta_train.learner.apply_gradient`).

A worker that dies (SIGKILL, a lost node) or stays silent past `worker_timeout_s` is
replaced by a fresh one with new particles; the estimates it owed (running and queued)
are logged as lost and their jobs handed to the replacement, so the run keeps advancing.

With the in-process backend and one worker, `meta_train.main` fuses both halves into one
jitted call per step instead (`Run.outer_step`); it is the same algorithm, and
`tests/test_server.py` checks that a synchronous Ray worker reproduces it.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from meta_train.build import Run, build_run
from meta_train.config import Config, ServerConfig, from_dict
from meta_train.learner import LearnerState, apply_gradient


@jax.jit
def _ravel(theta: Any) -> jax.Array:
    return ravel_pytree(theta)[0]


def flat_theta(theta: Any) -> np.ndarray:
    """θ as one float32 host vector: what workers receive."""
    return np.asarray(jax.device_get(_ravel(theta)))


class Estimate(NamedTuple):
    """What a worker sends back for one estimate.

    Attributes:
      grad: the flat meta-gradient (float32 [D]).
      metrics: the window's metrics (meta-loss, resets, estimate variance, ...).
      version: the θ version it was computed from.
      worker: the worker's index.
      incarnation: how many times that worker had been replaced.
      inner_steps: inner-training steps it ran (all pairs, both antithetic members).
      seconds: its wall time in the worker.
      first: the worker's first estimate since it started (its time includes compiling
        and the particles' start).
      cpu_seconds: CPU time its process spent on it (all threads).
    """

    grad: np.ndarray
    metrics: dict[str, float]
    version: int
    worker: int
    incarnation: int
    inner_steps: int
    seconds: float
    first: bool = False
    cpu_seconds: float = 0.0


class GradientWorker:
    """Owns particles and estimates meta-gradients of whatever θ it is handed.

    Args:
      config: the run's config (a `Config`, or its `to_dict()` as Ray ships it).
      index: the worker's index among the run's workers.
      incarnation: replacements of this index so far (fresh particles each time).
      pin_core: pin this process to that CPU core before JAX starts (Ray workers).
      run: an already built run to share (the in-process backend); built from `config`
        otherwise, loading the datasets in this process.
    """

    def __init__(
        self,
        config: Config | dict,
        index: int,
        incarnation: int = 0,
        pin_core: int | None = None,
        run: Run | None = None,
    ):
        if pin_core is not None:
            cores = sorted(os.sched_getaffinity(0))
            # From the last core down: core 0 keeps the learner and Ray's daemons, which
            # the OS tends to start there, off the first worker.
            os.sched_setaffinity(0, {cores[-1 - pin_core % len(cores)]})
            from meta_train.devices import use_cpu_cores  # noqa: PLC0415

            use_cpu_cores()  # one CPU device: the pinned core
        self.run = run or build_run(config if isinstance(config, Config) else from_dict(config))
        self.index, self.incarnation = index, incarnation
        self._k_particles, self._key = self.run.worker_keys(index, incarnation)
        self._particles = None
        self._count = 0  # estimates made: the clock of the groups' template schedule
        self._inner = self.run.config.meta.inner_steps_per_outer_step
        # θ travels flat (one buffer); its structure is the learned optimizer's. The same
        # structure gives an equal `unravel`, so workers of one process share compilations.
        self._unravel = ravel_pytree(self.run.lopt.init_meta(jax.random.PRNGKey(0)))[1]

    def estimate(self, theta: Any, version: int) -> Estimate:
        """One estimate of the meta-gradient at `theta` (version `version`)."""
        t0, c0 = time.perf_counter(), time.process_time()
        if self._particles is None:  # particles need θ: they start with a burn-in under it
            theta_tree = jax.jit(self._unravel)(theta)  # one dispatch, not one per leaf
            self._particles = self.run.init_particles(theta_tree, self._k_particles)
        grad, self._particles, metrics, self._key = self.run.estimate_flat(
            self._particles, theta, self._unravel, self._key, self._count
        )
        first = self._count == 0
        self._count += 1
        grad, metrics = jax.device_get((grad, metrics))
        return Estimate(
            np.asarray(grad),
            metrics.as_dict(),
            version,
            self.index,
            self.incarnation,
            self._inner,
            time.perf_counter() - t0,
            first,
            time.process_time() - c0,
        )

    def pid(self) -> int:
        """The worker's process id (tests kill it)."""
        return os.getpid()


class _Job(NamedTuple):
    worker: int
    theta: Any  # what the backend hands workers: θ itself, or its object-store reference
    version: int
    started: float
    incarnation: int = 0  # of the worker it was handed to


def _vacancies(jobs: Any, num_workers: int, depth: int) -> list[int]:
    """Worker indices, once per free slot, for workers with fewer than `depth` jobs."""
    busy = collections.Counter(j.worker for j in jobs)
    return [i for i in range(num_workers) for _ in range(depth - busy[i])]


class InProcessWorkers:
    """Gradient workers as objects of this process, run one after another.

    Estimates are computed when the learner asks for them, in the order they were started,
    so asynchronous mode here is a deterministic round-robin: with W workers and one
    estimate per step, each estimate is W - 1 versions old.
    """

    def __init__(self, run: Run, num_workers: int):
        self.workers = [GradientWorker(run.config, i, run=run) for i in range(num_workers)]
        self.incarnations = [0] * num_workers
        self._queue: collections.deque[_Job] = collections.deque()
        self.restarts = self.lost = 0  # in-process workers do not die on their own
        self.events: list[str] = []

    def publish(self, theta: Any, version: int) -> Any:
        del version
        return flat_theta(theta)  # a host copy: the learner donates its θ buffers

    def vacancies(self, depth: int) -> list[int]:
        return _vacancies(self._queue, len(self.workers), depth)

    def start(self, worker: int, theta: Any, version: int) -> None:
        self._queue.append(_Job(worker, theta, version, time.perf_counter()))

    def next(self) -> Estimate:
        job = self._queue.popleft()
        return self.workers[job.worker].estimate(job.theta, job.version)

    def alive(self) -> int:
        return len(self.workers)

    def close(self) -> None:
        self._queue.clear()


STARTUP_GRACE_S = 300.0


def start_ray(config: Config) -> bool:
    """Connects to Ray as `[server]` says, unless this process already is; True when it
    connected now (it then shuts Ray down when done).

    `meta_train.main` calls it before JAX starts: Ray forks its daemons, and forking a
    process whose JAX threads run is unsafe.
    """
    import ray  # noqa: PLC0415 - only the Ray backend needs it

    if ray.is_initialized():
        return False
    s = config.server
    if s.ray_address:
        ray.init(address=s.ray_address, log_to_driver=False)
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no ~/.ray token locally
        ray.init(
            num_cpus=max(s.workers, len(os.sched_getaffinity(0))),
            include_dashboard=False,
            log_to_driver=False,
        )
    return True


class RayWorkers:
    """Gradient workers as Ray actors, one CPU each (pinned to a core when asked).

    θ goes into the object store once per version (`publish`); every actor call carries the
    reference, which Ray resolves from the store of the worker's node.
    """

    def __init__(self, config: Config, num_workers: int):
        import ray  # noqa: PLC0415 - only the Ray backend needs it

        self._ray = ray
        s = config.server
        self._started_ray = start_ray(config)
        self._config = config.to_dict()
        self._pin = s.pin_cores
        self._timeout = s.worker_timeout_s
        self._actor_cls = ray.remote(num_cpus=1, max_restarts=0)(GradientWorker)
        self.incarnations = [0] * num_workers
        self._answered = [False] * num_workers  # has this incarnation sent an estimate?
        self._last_done = [0.0] * num_workers  # when each worker last sent an estimate
        self.actors = [self._spawn(i) for i in range(num_workers)]
        self._inflight: dict[Any, _Job] = {}
        self.restarts = self.lost = 0
        self.events: list[str] = []  # replacements, in words, until the server reads them

    def _spawn(self, i: int):
        pin = i if self._pin else None
        return self._actor_cls.remote(self._config, i, self.incarnations[i], pin)

    def publish(self, theta: Any, version: int) -> Any:
        del version
        return self._ray.put(flat_theta(theta))

    def vacancies(self, depth: int) -> list[int]:
        return _vacancies(self._inflight.values(), len(self.actors), depth)

    def start(self, worker: int, theta: Any, version: int) -> None:
        ref = self.actors[worker].estimate.remote(theta, version)
        job = _Job(worker, theta, version, time.perf_counter(), self.incarnations[worker])
        self._inflight[ref] = job

    def _redo(self, job: _Job, why: str) -> None:
        """Hands a lost job to a fresh incarnation of its worker, replacing the worker
        unless that already happened (a dead worker's queued jobs fail one by one)."""
        i = job.worker
        if job.incarnation == self.incarnations[i]:
            try:
                self._ray.kill(self.actors[i], no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
            self.incarnations[i] += 1
            self._answered[i] = False
            self.restarts += 1
            self.actors[i] = self._spawn(i)
            self.events.append(f"worker {i} {why}; replaced (incarnation {self.incarnations[i]})")
        self.lost += 1
        self.start(i, job.theta, job.version)

    def _running(self) -> dict[Any, _Job]:
        """Each worker's oldest job in flight, by reference: the one it is running (the
        others wait behind it in its queue)."""
        front: dict[int, Any] = {}
        for ref, job in self._inflight.items():
            front.setdefault(job.worker, ref)
        return {ref: self._inflight[ref] for ref in front.values()}

    def _deadline(self, job: _Job) -> float:
        # It runs since it was sent or since its worker's last estimate, whichever is
        # later. A worker's first estimate also loads its datasets and compiles: it gets at
        # least STARTUP_GRACE_S before it counts as silent.
        fresh = not self._answered[job.worker]
        since = max(job.started, self._last_done[job.worker])
        return since + (max(self._timeout, STARTUP_GRACE_S) if fresh else self._timeout)

    def next(self) -> Estimate:
        ray = self._ray
        while True:
            if not self._inflight:
                raise RuntimeError("no estimate in flight: start workers first")
            running = self._running()
            first = min(running, key=lambda r: self._deadline(running[r]))
            wait = max(self._deadline(running[first]) - time.perf_counter(), 0.0)
            ready, _ = ray.wait(list(self._inflight), num_returns=1, timeout=wait)
            if not ready:  # that job's worker is silent past its deadline: declare it lost
                job = self._inflight.pop(first)
                secs = time.perf_counter() - max(job.started, self._last_done[job.worker])
                self._redo(job, f"silent for {secs:.0f} s")
                continue
            ref = ready[0]
            job = self._inflight.pop(ref)
            try:
                est = ray.get(ref)
            except ray.exceptions.RayActorError:
                self._redo(job, "died")
                continue
            self._answered[job.worker] = True
            self._last_done[job.worker] = time.perf_counter()
            return est

    def alive(self) -> int:
        """Workers in service (a lost one is replaced at once, so all unless Ray could not
        start a replacement)."""
        return len(self.actors)

    def close(self) -> None:
        for actor in self.actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self._inflight.clear()
        if self._started_ray:
            self._ray.shutdown()


RECENT = 20


@dataclasses.dataclass
class ServerStats:
    """Counters of the gradient server since this process started (logged each step)."""

    staleness: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped: int = 0
    applied: int = 0
    # Per worker, (inner steps, seconds) of its last RECENT estimates: its throughput
    # without the compilation of its first estimates once they are old enough.
    recent: collections.defaultdict = dataclasses.field(
        default_factory=lambda: collections.defaultdict(lambda: collections.deque(maxlen=RECENT))
    )


class GradientServer:
    """The learner's side of the gradient server: one `step` per outer step.

    Args:
      run: the run (its config's `[server]` section says the backend, mode and limits).
      workers: the backend's workers (`InProcessWorkers` or `RayWorkers`); built from the
        config when None.
    """

    def __init__(self, run: Run, workers: InProcessWorkers | RayWorkers | None = None):
        s = run.config.server
        self.run, self.mode = run, s.mode
        self.max_staleness = s.max_staleness
        self.per_step = s.estimates_per_step
        self.queue_depth = s.queue_depth
        if workers is None:
            if s.backend == "ray":
                workers = RayWorkers(run.config, s.workers)
            else:
                workers = InProcessWorkers(run, s.workers)
        self.workers = workers
        self.stats = ServerStats()

    def step(self, state: LearnerState, step: int) -> tuple[LearnerState, dict]:
        """Outer step `step`: gathers estimates for θ version `step`, applies their mean.

        Args:
          state: the learner state (no particles); consumed.
          step: outer steps done (the θ version being published).

        Returns:
          The new learner state and the step's metrics (the estimates' mean metrics, the
          update's, and the server's counters under `server/`).
        """
        theta = self.workers.publish(state.theta, step)
        for i in self.workers.vacancies(self.queue_depth):
            self.workers.start(i, theta, step)
        taken: list[Estimate] = []
        dropped = 0
        while len(taken) < self.per_step:
            est = self.workers.next()
            age = step - est.version
            self.stats.staleness[age] += 1
            if not est.first:  # compilation is not throughput
                self.stats.recent[est.worker].append((est.inner_steps, est.seconds))
            if age > self.max_staleness:
                dropped += 1
            else:
                taken.append(est)
            # Async: a worker finishing while the meta-batch still fills starts again at
            # once on the newest θ; the one that completes it waits for the update (ms),
            # so it starts on θ of the next version.
            if self.mode == "async" and len(taken) < self.per_step:
                self.workers.start(est.worker, theta, step)
        self.stats.dropped += dropped
        self.stats.applied += len(taken)
        grad = np.mean([e.grad for e in taken], axis=0)  # of one: that one, exactly
        metrics = {k: sum(e.metrics[k] for e in taken) / len(taken) for k in taken[0].metrics}
        # The estimates' metrics stay on the host: only the gradient goes to the device.
        state, update_metrics = apply_gradient(state, grad, {}, self.run.outer_opt)
        return state, {**metrics, **update_metrics, **self._server_metrics(taken, dropped)}

    def _server_metrics(self, taken: list[Estimate], dropped: int) -> dict[str, float]:
        out = {
            "server/workers_alive": float(self.workers.alive()),
            "server/estimates": float(len(taken)),
            "server/dropped_stale": float(dropped),
            "server/dropped_stale_total": float(self.stats.dropped),
            "server/worker_restarts": float(self.workers.restarts),
            "server/lost_estimates": float(self.workers.lost),
        }
        total = sum(self.stats.staleness.values())
        out["server/staleness_mean"] = (
            sum(a * n for a, n in self.stats.staleness.items()) / total if total else 0.0
        )
        out["server/staleness_max"] = float(max(self.stats.staleness, default=0))
        for age, n in sorted(self.stats.staleness.items()):
            out[f"server/staleness_{age}"] = float(n)
        for w, recent in sorted(self.stats.recent.items()):
            steps, secs = sum(n for n, _ in recent), sum(t for _, t in recent)
            out[f"server/worker{w}_inner_steps_per_s"] = steps / secs if secs > 0 else 0.0
        return out

    def events(self) -> list[str]:
        """Worker replacements since the last call, in words (for the terminal and logs)."""
        out, self.workers.events = self.workers.events, []
        return out

    def close(self) -> None:
        self.workers.close()


def uses_server(server: ServerConfig) -> bool:
    """Whether a run with these `[server]` settings goes through the gradient server (else:
    the fused in-process step, whose checkpoints hold the particles)."""
    return server.backend != "in_process" or server.workers > 1
