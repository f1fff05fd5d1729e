"""The main job: meta-train a learned optimizer, then evaluate it against tuned Adam.

    python -m meta_train.main --config configs/default.toml [--resume] [section.key=value ...]

Writes into `run.out_dir`: `config.json` (the resolved config), `checkpoints/` (orbax;
`best.json` marks the step with the best meta-validation score, which is never rotated
away and is what the evaluation and `lopt.export.load_optax` load), `metrics.jsonl` and
`wandb/` (offline by default; meta-validation under `valid/`), and `eval/` (results.json,
results.md, curves.png).

The wandb run plots everything against `outer_step`, carries the evaluation (its table as
`eval/results`, its curves as `eval/curves`) and, as an Artifact of type `learned-optimizer`
named `lopt-<run name>`, the best checkpoint step (with best.json and config.json; its
metadata is the config plus the best step and score), which
`lopt.export.load_optax_artifact("lopt-<run name>:latest", ...)` loads again.

A new run refuses a folder that holds checkpoints; `--resume` refuses a folder without one
(a mistyped folder never starts over). User errors (bad config values, a missing dataset,
a config that differs from the checkpoint's, ...) end with one message and exit code 2;
`--debug` shows their traceback.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp

from lopt.export import ARTIFACT_TYPE
from meta_train.build import Run, build_run
from meta_train.checkpoint import (
    BEST_FILE,
    Checkpointer,
    check_compatible,
    describe_directory,
    load_theta,
    pick_step,
    read_best,
    saved_steps,
    write_best,
)
from meta_train.cli import run_cli
from meta_train.config import Config, ConfigError, ServerConfig, load_config, save_config
from meta_train.devices import use_cpu_cores
from meta_train.logging import ProgressBar, RunLogger
from meta_train.server import GradientServer, start_ray, uses_server
from meta_train.validation import Guard, build_validator, make_guard

_EXAMPLES = """examples:
  lopt train --config configs/default.toml
  lopt train --config configs/default.toml meta.outer_steps=500 run.out_dir=runs/short
  lopt train --config configs/default.toml server.backend=ray server.workers=2
  python -m meta_train.main --config configs/mixed.toml --resume run.out_dir=runs/mixed
"""


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The main job's arguments (``prog`` names the command in usage lines)."""
    p = argparse.ArgumentParser(
        prog=prog or "python -m meta_train.main",
        description=__doc__.split("\n")[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        default=None,
        help="TOML run configuration, or a run folder's config.json (default: built-in defaults)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last complete checkpoint in run.out_dir (fails if there is none)",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation after meta-training")
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of user errors, not only a message"
    )
    p.add_argument("overrides", nargs="*", help="config overrides: section.key=value")
    return p.parse_intermixed_args(argv)  # flags may come between the overrides


Resume = bool | Literal["allow"]


def check_run_folder(out_dir: str | Path, resume: Resume) -> int | None:
    """Checks a run folder against `resume` before anything is built or written.

    Args:
      out_dir: the run folder (`run.out_dir`).
      resume: True: it must hold a checkpoint; False: it must not; "allow": either.

    Returns:
      The latest complete step in `out_dir/checkpoints`, or None.

    Raises:
      ConfigError: the folder does not fit `resume` (nothing is created or changed).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.out_dir {out} is a file, not a folder")
    ckpt_dir = out / "checkpoints"
    steps = saved_steps(str(ckpt_dir))
    if resume is True and not steps:
        found = describe_directory(str(ckpt_dir)) if ckpt_dir.is_dir() else "it does not exist"
        raise ConfigError(
            f"--resume: no checkpoint to resume in {ckpt_dir.absolute()} ({found}); check "
            "run.out_dir, or drop --resume to start a new run there (nothing was created)"
        )
    if resume is False and steps:
        raise ConfigError(
            f"{out} already holds checkpoints (latest step {steps[-1]}); pass --resume to "
            "continue it, or choose another run.out_dir (nothing was overwritten)"
        )
    return steps[-1] if steps else None


def _restore(run: Run, ckpt: Checkpointer, step: int, server: bool):
    """Restores a learner state after checking the saved config is compatible.

    A checkpoint of the fused in-process step holds the particles, one of the gradient
    server does not (workers own them): either resumes either way, the particles dropped
    (server) or started afresh from the restored θ (fused).
    """
    saved = ckpt.read_config(step)
    check_compatible(saved, run.config.to_dict())
    abstract = run.abstract_state(step)
    # Runs from before the gradient server have no [server]: the fused step, with particles.
    has_particles = not uses_server(ServerConfig(**saved.get("server", {})))
    if not has_particles:
        abstract = abstract.replace(est_state=())
    # The abstract state carries this process's placement: arrays restore already sharded.
    theta, rest, _ = ckpt.restore(abstract.theta, abstract.replace(theta=()), step)
    state = rest.replace(theta=theta)
    if server:
        return run.place_server(state.replace(est_state=()))
    if not has_particles:
        k_particles = jax.random.fold_in(run.worker_keys(0)[0], step)
        state = state.replace(est_state=run.init_particles(state.theta, k_particles))
    return state


class _Validation:
    """Meta-validation inside the training loop: scores, logs, the guard and the best-step
    marker (`best.json`), restored from that marker on resume."""

    def __init__(
        self, run: Run, ckpt: Checkpointer, logger: RunLogger, bar, start: int, resumed: bool
    ):
        self.ckpt, self.logger, self.bar = ckpt, logger, bar
        self.metric = run.config.valid.metric
        self.guard: Guard = make_guard(run)
        # A run resumed at step 0 (stopped before its second save) has a marker too.
        saved = read_best(ckpt.directory) if resumed else None
        # Records after the resumed step are redone (validation is deterministic).
        self.history = [r for r in (saved or {}).get("history", []) if r["step"] <= start]
        self.guard.replay(self.history)
        self.guard.stop = False  # resuming a run the guard stopped is the user's decision
        self.t0 = time.perf_counter()
        self.validator = build_validator(run)
        self.seconds = self.validator.adam_seconds
        self.last_seconds = 0.0
        tasks = self.validator.describe()
        logger.summary({"valid_tasks": tasks})
        horizons = ", ".join(str(t["horizon"]) for t in tasks)
        adam = ", ".join(f"{t['adam_final']:.3f}" for t in tasks)
        v = run.config.valid
        bar.write(
            f"meta-validation: {len(tasks)} held-out tasks (horizons {horizons}) x "
            f"{v.num_seeds} seeds; Adam {v.adam_lr:g} final valid loss {adam}"
        )

    def run(self, done: int, state) -> bool:
        """Validates θ after `done` outer steps; True when it is the best so far."""
        result = self.validator(state.theta)
        self.last_seconds = result["seconds"]
        self.seconds += result["seconds"]
        score = result["score"]
        is_best, message = self.guard.observe(done, score)
        self.history.append(
            {
                "step": done,
                "score": score if math.isfinite(score) else None,
                "ratio_final": result["ratio_final"],
                "ratio_mean": result["ratio_mean"],
            }
        )
        cost = self.seconds / max(time.perf_counter() - self.t0, 1e-9)
        values = {f"valid/{k}": v for k, v in result.items()}
        values.update(
            {
                "valid/best_score": self.guard.best_score,
                "valid/best_step": float(self.guard.best_step or 0),
                "valid/cost_fraction": cost,
                "valid/lr_scale": self.guard.lr_scale,
                "valid/guard_fired": float(message is not None),
            }
        )
        self.logger.log(done, values)
        flag = (
            " (new best)"
            if is_best
            else f" (best {self.guard.best_score:.4f} at {self.guard.best_step})"
        )
        self.bar.write(
            f"valid @ {done}: score {score:.4f} = {self.metric} valid loss / Adam's{flag}; "
            f"final {result['final_loss']:.4f} ({result['ratio_final']:.3f}x Adam), "
            f"mean {result['mean_loss']:.4f} ({result['ratio_mean']:.3f}x); "
            f"{result['seconds']:.1f} s, {cost:.1%} of the run"
        )
        if message is not None:
            self.bar.write(f"guard @ {done}: {message}")
            self.logger.alert("meta-validation is worsening", message)
        return is_best

    def steps(self) -> set[int]:
        """The outer steps validated so far."""
        return {r["step"] for r in self.history}

    def mark(self) -> None:
        """Writes the marker (the best step, saved by now, and the history), then lets the
        checkpointer drop a formerly best step."""
        if self.guard.best_step is None:
            return
        write_best(
            self.ckpt.directory,
            {
                "step": self.guard.best_step,
                "score": self.guard.best_score,
                "metric": self.metric,
                "lr_scale": self.guard.lr_scale,
                "guard_fired": self.guard.fired,
                "history": self.history,
            },
        )
        self.ckpt.rotate()

    def summary(self) -> dict:
        return {
            "valid_best_step": self.guard.best_step,
            "valid_best_score": self.guard.best_score,
            "valid_seconds": self.seconds,
            "valid_guard_fired": self.guard.fired,
            "valid_stopped": self.guard.stop,
        }


def meta_train(run: Run, *, resume: Resume = False, stream=None):
    """Runs (or resumes) meta-training.

    With wandb on, the run ends with the best checkpoint step logged as an Artifact (see
    `log_best_artifact`).

    Args:
      run: the run's pieces (see `meta_train.build`).
      resume: True: continue from the last complete checkpoint in `run.out_dir` (there must
        be one); False: start a new run (the folder must hold no checkpoint); "allow":
        continue if there is a checkpoint, else start.
      stream: where the progress line goes (stderr by default).

    Returns:
      The final learner state and the last logged metrics.

    Raises:
      ConfigError: the folder does not fit `resume`.
      ConfigMismatchError: resuming with a config that changes a fixed key.
      CheckpointError: the checkpoint is unusable; NonFiniteThetaError: θ stopped being
        finite (it is never saved; the earlier checkpoints stay).
    """
    state, metrics, logger = _meta_train(run, resume, stream)
    logger.finish()
    return state, metrics


def _meta_train(run: Run, resume: Resume, stream) -> tuple[Any, dict, RunLogger]:
    """`meta_train`, leaving the logger of a successful run open for the evaluation (a
    failed run's logger is finished, marked failed)."""
    cfg, m = run.config, run.config.meta
    out = Path(cfg.run.out_dir)
    latest = check_run_folder(out, resume)
    if latest is None:
        run.start_theta  # noqa: B018 - loads `meta.init_from` before anything is written
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpointer(str(out / "checkpoints"), max_to_keep=cfg.run.max_to_keep)
    server = None
    try:
        if uses_server(cfg.server):
            server = GradientServer(run)
        if latest is not None:
            state = _restore(run, ckpt, latest, server is not None)
            print(f"resumed from outer step {int(state.step)}", file=stream or sys.stderr)
        else:
            state = run.init_server_state() if server else run.init_state()
        save_config(cfg, out / "config.json")
        logger = RunLogger(
            str(out),
            cfg.to_dict(),
            mode=cfg.run.wandb_mode,
            project=cfg.run.wandb_project,
            name=cfg.run.name,
            resume=latest is not None,
            step_metric="outer_step",  # the x-axis of every chart
        )
    except BaseException:
        ckpt.close()
        if server is not None:
            server.close()
        raise
    start = int(state.step)
    total = min(m.stop_after, m.outer_steps) if m.stop_after else m.outer_steps
    bar = ProgressBar(total, initial=start, stream=stream)
    inner_per_outer = m.inner_steps_per_outer_step * (server.per_step if server else 1)
    metrics: dict = {}
    failed = True
    try:
        resumed = latest is not None
        validation = (
            _Validation(run, ckpt, logger, bar, start, resumed) if cfg.valid.every else None
        )
        if validation is not None:
            state = state.replace(lr_scale=jnp.asarray(validation.guard.lr_scale, jnp.float32))
            # The starting point is the first candidate for the best; a resumed run also
            # redoes a due validation that a crash after its checkpoint left unrecorded
            # (its step is saved already: checkpoints are never overwritten).
            due = start % cfg.valid.every == 0 or start == total
            if not resumed or (due and start not in validation.steps()):
                if validation.run(start, state) and not resumed:
                    ckpt.save(0, state.theta, state.replace(theta=()), cfg.to_dict())
                validation.mark()
        t_log, logged_at = time.perf_counter(), start
        last_saved = latest or 0
        for step in range(start, total):
            if server is None:
                state, metrics = run.outer_step(state, step)
            else:
                state, metrics = server.step(state, step)
                for event in server.events():
                    bar.write(f"server @ {step}: {event}")
                    logger.alert("gradient worker replaced", event)
            done = step + 1
            if step == start:  # the first call compiled: keep it out of the throughput
                jax.block_until_ready(metrics)
                logger.summary({"compile_and_first_step_s": time.perf_counter() - t_log})
                t_log, logged_at = time.perf_counter(), done
            if done % cfg.run.log_every == 0 or done == total:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if run.switching:  # which shapes are in play, and what that compiled
                    metrics["templates_visited"] = len(run.schedule.visited(done))
                    metrics["compiles"] = sum(run.compile_counts().values())
                now = time.perf_counter()
                if done > logged_at:
                    metrics["inner_steps_per_s"] = (
                        (done - logged_at) * inner_per_outer / max(now - t_log, 1e-9)
                    )
                t_log, logged_at = now, done
                # Checkpoint events: the dashboard draws the last saved step as a staircase.
                metrics["checkpoint/last_saved_step"] = float(last_saved)
                logger.log(done, metrics)
                fields = {
                    "meta_loss": metrics["meta_loss"],
                    "est_var": metrics["estimate_variance"],
                    "grad_cos": metrics["grad_cosine"],
                    "reset_frac": metrics["reset_fraction"],
                    "inner_steps_per_s": metrics.get("inner_steps_per_s", float("nan")),
                }
                if server is not None:
                    fields["workers_alive"] = metrics["server/workers_alive"]
                bar.update(done - bar.n, **fields)
            validated = validation is not None and (done % cfg.valid.every == 0 or done == total)
            best = stop = False
            if validated:
                best = validation.run(done, state)
                stop = validation.guard.stop
                state = state.replace(lr_scale=jnp.asarray(validation.guard.lr_scale, jnp.float32))
                t_log += validation.last_seconds  # validation is not training throughput
            if best or stop or done % cfg.run.checkpoint_every == 0 or done == total:
                ckpt.save(done, state.theta, state.replace(theta=()), cfg.to_dict())
                last_saved = done
            if validated:
                validation.mark()  # after the save: the marked step is always on disk
            if stop:
                break
        if validation is not None:
            logger.summary(validation.summary())
        failed = False
    finally:
        if server is not None:
            server.close()
        bar.close()
        if failed:
            logger.finish(exit_code=1)  # a failed run shows as such in wandb
        ckpt.close()  # waits for the last save: the artifact below reads it
    try:
        ref = log_best_artifact(logger, out, cfg.to_dict())
    except BaseException:
        logger.finish(exit_code=1)
        raise
    if ref is not None:
        where = f", run_dir={str(out)!r}" if logger.mode == "offline" else ""
        print(
            f"wandb: best meta-parameters logged as artifact {ref}; load them with "
            f"lopt.export.load_optax_artifact({ref!r}{where})",
            file=stream or sys.stderr,
        )
    return state, metrics, logger


def artifact_name(run_name: str) -> str:
    """The wandb Artifact name of a run's best meta-parameters: ``lopt-<run name>``, with
    characters wandb does not allow in names replaced by '-'."""
    return "lopt-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name)


def log_best_artifact(logger: RunLogger, out_dir: str | Path, config: dict) -> str | None:
    """Logs the run's best checkpoint step as a wandb Artifact of type `ARTIFACT_TYPE`.

    The artifact holds what `lopt.export.load_optax` needs: the orbax folder of the step
    `pick_step` chooses (the best-marked one, else the latest), best.json when it marks that
    step, and config.json. Its metadata is the config plus `best_step`, `best_score` and
    `valid_metric`; its aliases are "latest", ``step-<N>`` and "best" when validation marked
    the step.

    Args:
      logger: the run's logger (nothing is logged when its wandb is disabled).
      out_dir: the run folder (holds checkpoints/ and config.json).
      config: the run configuration.

    Returns:
      ``"<name>:latest"``, or None when nothing was logged (wandb disabled, no checkpoint).
    """
    ckpt_dir = Path(out_dir) / "checkpoints"
    if logger.run is None or not saved_steps(str(ckpt_dir)):
        return None
    step = pick_step(str(ckpt_dir))
    best = read_best(str(ckpt_dir))
    marked = best is not None and best["step"] == step
    files = {str(step): ckpt_dir / str(step), "config.json": Path(out_dir) / "config.json"}
    if marked:
        files[BEST_FILE] = ckpt_dir / BEST_FILE
    score = best.get("score") if marked else None
    metadata = {
        **config,
        "best_step": step,
        "best_score": score if score is not None and math.isfinite(score) else None,
        "valid_metric": best.get("metric") if marked else None,
    }
    name = artifact_name(logger.name)
    aliases = [f"step-{step}", *(["best"] if marked else [])]
    logger.log_artifact(name, ARTIFACT_TYPE, files, metadata, aliases)
    return f"{name}:latest"


def evaluate_run(run: Run, theta, out_dir: Path) -> dict:
    """Evaluates the learned optimizer with meta-parameters `theta` against tuned Adam on
    held-out tasks."""
    from evaluate.suite import run_suite  # noqa: PLC0415 - matplotlib only when needed
    from lopt.export import as_optax  # noqa: PLC0415

    cfg = run.config
    horizon = cfg.eval.num_steps or cfg.meta.max_episode_len
    name = f"learned ({cfg.meta.estimator})"
    learned = {name: lambda n: as_optax(run.lopt, theta, n)}
    return run_suite(run.family, learned, cfg.eval, run.held_out_key(), str(out_dir), horizon)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs the main job (``lopt train``); returns its exit status (2 after a user error)."""
    args = parse_args(argv, prog)
    use_cpu_cores()  # one CPU device per core; particles are sharded across them
    return run_cli(lambda: _main(args), debug=args.debug)


def _main(args: argparse.Namespace) -> int:
    config: Config = load_config(args.config, args.overrides)
    # Cheap checks first: a wrong folder fails before the datasets load.
    check_run_folder(config.run.out_dir, args.resume)
    # Ray forks its daemons: start it before JAX starts threads (the workers connect later).
    ray_started = config.server.backend == "ray" and start_ray(config)
    try:
        return _train_and_evaluate(config, args)
    finally:
        if ray_started:
            import ray  # noqa: PLC0415

            ray.shutdown()


def _train_and_evaluate(config: Config, args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    run = build_run(config)
    # The wandb run stays open through the evaluation, which it then carries too.
    state, _, logger = _meta_train(run, args.resume, None)
    failed = True
    try:
        t_train = time.perf_counter() - t0
        print(f"meta-training: {int(state.step)} outer steps in {t_train:.0f} s", file=sys.stderr)
        if not args.no_eval:
            out = Path(config.run.out_dir) / "eval"
            ckpt_dir = Path(config.run.out_dir) / "checkpoints"
            step = pick_step(str(ckpt_dir))  # the best-marked step, else the latest
            theta = load_theta(str(ckpt_dir), step)[0] if step != int(state.step) else state.theta
            print(f"evaluating the meta-parameters of outer step {step}", file=sys.stderr)
            results = evaluate_run(run, theta, out)
            logger.log_table("eval/results", *eval_table(results))
            logger.log_image("eval/curves", out / "curves.png", caption=f"outer step {step}")
            print(results["table"])
            print(f"\nresults: {out}/results.json, {out}/results.md, {out}/curves.png")
        failed = False
    finally:
        logger.finish(exit_code=1 if failed else None)
    print(f"total wall time {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


def eval_table(results: dict) -> tuple[list[str], list[list]]:
    """The evaluation's summary as table columns and rows: one row per optimizer (and task
    kind, whose losses are in different units), the mean and std over tasks x seeds of each
    metric of results.json's summary, and the diverged runs.

    Args:
      results: what `evaluate.suite.run_suite` returns (or its results.json).

    Returns:
      `(columns, rows)`; missing or non-finite numbers are None.
    """
    by_kind = results.get("summary_by_kind") or {"all": results["summary"]}
    labels = results.get("labels", {})
    keys: dict[str, None] = {}  # every optimizer's metrics, in order of appearance
    for summary in by_kind.values():
        for name in results["optimizers"]:
            keys.update((k, None) for k, v in summary[name].items() if isinstance(v, dict))
    columns = ["optimizer", "kind", *(f"{k} {s}" for k in keys for s in ("mean", "std"))]
    columns += ["diverged", "runs"]
    rows = []
    for kind, summary in by_kind.items():
        for name in results["optimizers"]:
            stats = summary[name]
            cells = [stats.get(k, {}).get(s) for k in keys for s in ("mean", "std")]
            rows.append([labels.get(name, name), kind, *cells, stats["diverged"], stats["runs"]])
    return columns, rows


if __name__ == "__main__":
    sys.exit(main())
