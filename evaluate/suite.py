"""Evaluation of learned optimizers against tuned Adam on held-out tasks.

Every training run is one jitted `lax.scan` with batches sampled by `jax.random` inside it;
seeds (and Adam's learning rates) are `vmap`ped, so one compilation serves a whole grid.
Arrays stay on the device until the end of `run_suite`, which converts them to Python
numbers once and writes `results.json`, `results.md` and `curves.png`.

    results = run_suite(family, {"learned": lambda n: as_optax(lopt, theta, n)},
                        EvalConfig(), jax.random.PRNGKey(1), "runs/x/eval", horizon=400)
    print(results["table"])

A run whose recorded losses or final metrics are not finite is flagged `diverged`; its
numbers are kept as NaN/inf (never replaced by a good-looking value), Adam's learning-rate
selection treats it as +inf, and the tables count diverged runs.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.xla_options import CPU_OPTIONS
from meta_train.config import EvalConfig
from meta_train.jit import jit

PRNGKey = jax.Array
TxFactory = Callable[[int], optax.GradientTransformationExtraArgs]

# Final metrics a run reports, as (key in the run's dict, column name in the tables).
_COLUMNS = (
    # The mean minibatch loss over the whole run: what meta-training on the mean training
    # loss optimises (area under the training curve).
    ("mean_train_loss", "mean train loss (run)"),
    ("final_train_loss", "train loss"),
    ("final_valid_loss", "valid loss"),
    ("final_test_loss", "test loss"),
    ("final_test_accuracy", "test acc"),
)
_FINAL_KEYS = (
    "mean_train_loss",
    "final_train_loss",
    "final_train_accuracy",
    "final_valid_loss",
    "final_valid_accuracy",
    "final_test_loss",
    "final_test_accuracy",
)
# Reported only by tasks whose `full_split_metrics` returns them (language models).
_OPTIONAL_KEYS = (
    "final_train_bits_per_byte",
    "final_valid_bits_per_byte",
    "final_test_bits_per_byte",
)
# Per task kind, the table's last column where classification shows test accuracy.
_KIND_COLUMN = {"lm": ("final_test_bits_per_byte", "test bits/byte")}
DEFAULT_KIND = "mlp"  # families written before task kinds existed sample MLPs
ADAM = "adam"
# Adam with its learning rate chosen on final training loss: the fair baseline when a
# learned optimizer was meta-trained on training loss.
ADAM_TRAIN = "adam_train"


def eval_steps(num_steps: int, eval_every: int) -> list[int]:
    """Steps after which `train` records the full-split validation loss.

    Args:
      num_steps: training steps.
      eval_every: evaluation period (values < 1 or > num_steps mean start and end only).

    Returns:
      `[0, e, 2e, ...]`, ending with `num_steps` (0 is the initial parameters).
    """
    e = _period(num_steps, eval_every)
    steps = list(range(0, num_steps + 1, e))
    if steps[-1] != num_steps:
        steps.append(num_steps)
    return steps


def task_kind(info: dict[str, Any]) -> str:
    """The kind of a task ('mlp', 'conv', 'lm', ...) from its family's info dict.

    Args:
      info: the info of `sample_with_info`; a missing 'kind' means 'mlp'.

    Returns:
      The kind's name.
    """
    return str(info.get("kind", DEFAULT_KIND))


def _columns(kind: str) -> tuple[tuple[str, str], ...]:
    """The table's (key, column name) pairs for tasks of `kind`."""
    return (*_COLUMNS[:-1], _KIND_COLUMN.get(kind, _COLUMNS[-1]))


def _final_keys(run: dict) -> tuple[str, ...]:
    """The final-metric keys a run's dict holds: the common ones, then optional ones."""
    return (*_FINAL_KEYS, *(k for k in _OPTIONAL_KEYS if k in run))


def _period(num_steps: int, eval_every: int) -> int:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return num_steps if eval_every < 1 else min(eval_every, num_steps)


def train_step(task: Any, tx: Any) -> Callable:
    """The `lax.scan` body of one training step: `((params, opt_state), key) -> (carry, loss)`.

    Args:
      task: the task (its minibatch is drawn from `key` inside the step).
      tx: an extra-args optax transformation (it gets `loss=`).

    Returns:
      The step function.
    """

    def step(carry, k):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(k, "train"))
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return (optax.apply_updates(params, updates), opt_state), loss

    return step


def _train(task: Any, tx: Any, num_steps: int, key: PRNGKey, eval_every: int) -> dict:
    """Un-jitted body of `train` (traceable; `tx` may hold traced hyperparameters)."""
    # Plain optax transformations reject `loss=`; this wrapper makes them ignore it.
    tx = optax.with_extra_args_support(tx)
    e = _period(num_steps, eval_every)
    init_key, data_key = jax.random.split(key)
    params = task.init(init_key)
    carry = (params, tx.init(params))
    keys = jax.random.split(data_key, num_steps)
    step = train_step(task, tx)

    def chunk(carry, ks):
        carry, losses = jax.lax.scan(step, carry, ks)
        return carry, (losses, task.full_split_metrics(carry[0], "valid")["loss"])

    # Nested scans evaluate every `e` steps without a per-step cond (which vmap would turn
    # into computing the full-split evaluation at every step).
    n_chunks, rest = divmod(num_steps, e)
    valid = [task.full_split_metrics(params, "valid")["loss"][None]]
    head = keys[: n_chunks * e].reshape(n_chunks, e, *keys.shape[1:])
    carry, (losses, chunk_valid) = jax.lax.scan(chunk, carry, head)
    losses, valid = [losses.reshape(-1)], valid + [chunk_valid]
    if rest:
        carry, tail_losses = jax.lax.scan(step, carry, keys[n_chunks * e :])
        losses.append(tail_losses)
    params = carry[0]

    out = {}
    for split in ("train", "valid", "test"):
        m = task.full_split_metrics(params, split)
        out[f"final_{split}_loss"] = m["loss"]
        out[f"final_{split}_accuracy"] = m["accuracy"]
        if "bits_per_byte" in m:  # known while tracing: the task is a static structure
            out[f"final_{split}_bits_per_byte"] = m["bits_per_byte"]
    if rest:
        valid.append(out["final_valid_loss"][None])
    out["train_curve"] = jnp.concatenate(losses)
    out["valid_curve"] = jnp.concatenate(valid)
    out["mean_train_loss"] = jnp.mean(out["train_curve"])
    finite = jnp.all(jnp.isfinite(out["train_curve"])) & jnp.all(jnp.isfinite(out["valid_curve"]))
    for k in _final_keys(out):
        finite &= jnp.isfinite(out[k])
    out["diverged"] = ~finite
    return out


@jit(cpu_options=CPU_OPTIONS, static_argnames=("tx", "num_steps", "eval_every"))
def train(
    task: Any,
    tx: optax.GradientTransformation,
    num_steps: int,
    key: PRNGKey,
    eval_every: int,
) -> dict[str, jax.Array]:
    """Trains `task` with `tx` for `num_steps` steps: one jitted `lax.scan`.

    `vmap` it over `key` for seeds (`train_seeds` does). The task is a jit argument, so tasks
    of one shape share a compilation; `tx` is static (hashable), so a new transformation
    object compiles anew.

    Args:
      task: a task with `init`, `loss`, `sample_batch` and `full_split_metrics`.
      tx: an optax transformation; it is called as `tx.update(g, s, params, loss=loss)`.
      num_steps: training steps.
      key: seeds the parameter init and the minibatches.
      eval_every: record the full-split validation loss every this many steps.

    Returns:
      `train_curve` [num_steps] minibatch training loss of every step (before its update);
      `valid_curve` full-split validation loss at `eval_steps(num_steps, eval_every)`;
      `final_{train,valid,test}_{loss,accuracy}` over whole splits after training, and
      `final_{train,valid,test}_bits_per_byte` when the task reports bits per byte;
      `diverged` (bool): some recorded loss or final metric is not finite.
    """
    return _train(task, tx, num_steps, key, eval_every)


@jit(cpu_options=CPU_OPTIONS, static_argnames=("tx", "num_steps", "eval_every"))
def train_seeds(
    task: Any,
    tx: optax.GradientTransformation,
    num_steps: int,
    keys: PRNGKey,
    eval_every: int,
) -> dict[str, jax.Array]:
    """`train` vmapped over `keys` (one run per key) in one compilation.

    Args:
      task: the task.
      tx: the optax transformation (static).
      num_steps: training steps.
      keys: [num_seeds] keys.
      eval_every: validation period.

    Returns:
      `train`'s dict with a leading seed axis on every entry.
    """
    return jax.vmap(lambda k: _train(task, tx, num_steps, k, eval_every))(keys)


def select_lr(final_valid_loss: jax.Array, diverged: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Picks the learning rate with the lowest mean final validation loss over seeds.

    Args:
      final_valid_loss: [num_lrs, num_seeds] full-split validation losses.
      diverged: [num_lrs, num_seeds] divergence flags.

    Returns:
      `(index, score)`: the chosen index and the [num_lrs] scores, where a learning rate
      with any diverged (or non-finite) seed scores +inf.
    """
    per_seed = jnp.where(diverged | ~jnp.isfinite(final_valid_loss), jnp.inf, final_valid_loss)
    score = jnp.mean(per_seed, axis=1)
    return jnp.argmin(score), score


@jit(cpu_options=CPU_OPTIONS, static_argnames=("num_steps", "eval_every"))
def tune_adam(
    task: Any,
    lrs: jax.Array,
    num_steps: int,
    keys: PRNGKey,
    eval_every: int,
) -> dict[str, Any]:
    """Adam over a learning-rate grid × seeds, vmapped in one compilation.

    Args:
      task: the task.
      lrs: [num_lrs] learning rates (traced: another grid of the same size reuses the compile).
      num_steps: training steps.
      keys: [num_seeds] keys, shared by every learning rate (same inits and batches).
      eval_every: validation period.

    Returns:
      `grid`: `train`'s dict with leading [num_lrs, num_seeds] axes; `score` [num_lrs]
      (see `select_lr`); `best_index`, `best_lr`; `best`: the grid entry at `best_index`
      ([num_seeds] leading axis); `all_diverged`: every learning rate diverged (the choice
      is then meaningless).
    """

    def one(lr, key):
        tx = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
        return _train(task, tx, num_steps, key, eval_every)

    lrs = jnp.asarray(lrs, jnp.float32)
    grid = jax.vmap(lambda lr: jax.vmap(lambda k: one(lr, k))(keys))(lrs)
    best, score = select_lr(grid["final_valid_loss"], grid["diverged"])
    best_train, _ = select_lr(grid["final_train_loss"], grid["diverged"])
    return {
        "grid": grid,
        "score": score,
        "best_index": best,
        "best_lr": lrs[best],
        "best": jax.tree.map(lambda x: x[best], grid),
        "best_train_index": best_train,
        "best_train": jax.tree.map(lambda x: x[best_train], grid),
        "all_diverged": jnp.all(jnp.isinf(score)),
    }


def _sample_tasks(family_or_tasks: Any, num_tasks: int, key: PRNGKey) -> list[tuple[Any, dict]]:
    if hasattr(family_or_tasks, "sample_with_info"):
        keys = jax.random.split(key, num_tasks)
        return [family_or_tasks.sample_with_info(k) for k in keys]
    pairs = list(family_or_tasks)
    if not pairs:
        raise ValueError("run_suite needs at least one task")
    return [(t, dict(info)) for t, info in pairs]


def _block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def run_suite(
    family_or_tasks: Any,
    learned: dict[str, TxFactory],
    config: EvalConfig,
    key: PRNGKey,
    out_dir: str | None,
    horizon: int,
) -> dict[str, Any]:
    """Evaluates learned optimizers and tuned Adam on held-out tasks.

    Args:
      family_or_tasks: a task family (`sample_with_info(key) -> (task, info)`), from which
        `config.num_tasks` tasks are drawn with `jax.random.split(key, num_tasks)`; or a list
        of `(task, info)` pairs, all of which are used.
      learned: name -> factory `num_steps -> optax transformation` of each learned optimizer.
      config: number of tasks and seeds, steps, Adam's grid, validation period.
      key: the held-out key (never used in meta-training).
      out_dir: where to write results.json, results.md and curves.png (None: write nothing).
      horizon: training steps when `config.num_steps` is 0 (meta-training's longest episode).

    Returns:
      A JSON-friendly dict: `config`, `eval_steps`, `optimizers` (names, learned first, then
      'adam'), `labels` (table row names), `summary` (per optimizer: mean/std over tasks ×
      seeds of every final metric, diverged count), `summary_by_kind` (kind -> the same over
      that kind's tasks only: losses of different kinds are in different units), `tasks`
      (per task: info, per optimizer per-seed numbers and curves, Adam's whole grid), and
      `table` (markdown; one table per kind when the tasks mix kinds).
    """
    for reserved in (ADAM, ADAM_TRAIN):
        if reserved in learned:
            raise ValueError(f"{reserved!r} is reserved for the tuned Adam baseline; rename it")
    num_steps = int(config.num_steps) or int(horizon)
    if not config.adam_lrs:
        raise ValueError("config.adam_lrs is empty")
    tasks = _sample_tasks(family_or_tasks, config.num_tasks, key)
    # One transformation object per optimizer: tasks of one shape then share a compile.
    txs = {name: factory(num_steps) for name, factory in learned.items()}
    lrs = jnp.asarray(config.adam_lrs, jnp.float32)

    raw = []
    for i, (task, _) in enumerate(tasks):
        # Same seed keys for every optimizer: same inits and batches (paired comparison).
        seed_keys = jax.random.split(jax.random.fold_in(key, 10_000 + i), config.num_seeds)
        runs, seconds = {}, {}
        for name, tx in txs.items():
            t0 = time.perf_counter()
            runs[name] = _block(train_seeds(task, tx, num_steps, seed_keys, config.eval_every))
            seconds[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        runs[ADAM] = _block(tune_adam(task, lrs, num_steps, seed_keys, config.eval_every))
        seconds[ADAM] = time.perf_counter() - t0
        raw.append((runs, seconds))

    # The only device-to-host transfer: everything at once, after all runs.
    raw = jax.device_get(raw)
    results = _assemble(tasks, raw, list(txs), config, num_steps)
    results["table"] = format_table(results)
    if out_dir is not None:
        write_outputs(results, out_dir)
    return results


def _lst(x: Any) -> Any:
    """numpy -> nested lists of Python numbers; non-finite floats become None (strict JSON)."""
    a = np.asarray(x)
    if a.dtype == bool or np.issubdtype(a.dtype, np.integer):
        return a.tolist()
    # The shortest decimal that round-trips float32 keeps the file small and exact.
    flat = [float(v) for v in a.astype(np.float32).ravel().astype(str)]
    out = np.array([v if math.isfinite(v) else None for v in flat], dtype=object)
    return out.reshape(a.shape).tolist()


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _seed_table(run: dict) -> dict[str, Any]:
    out = {k: _lst(run[k]) for k in _final_keys(run)}
    out["diverged"] = _lst(run["diverged"])
    out["train_curve"] = _lst(run["train_curve"])
    out["valid_curve"] = _lst(run["valid_curve"])
    return out


def _stats(values: np.ndarray) -> dict[str, Any]:
    # NaN/inf propagate into mean/std on purpose: a diverged run never looks good.
    v = np.asarray(values, np.float64).reshape(-1)
    finite = bool(np.isfinite(v).all())
    return {"mean": _num(np.mean(v)), "std": _num(np.std(v)), "all_finite": finite}


def _summary(runs: Sequence[dict]) -> dict[str, Any]:
    """Mean ± std over every (task, seed) of `runs` (each with a leading seed axis) of each
    final metric every run reports."""
    keys = [k for k in _final_keys(runs[0]) if all(k in r for r in runs)]
    out = {k: _stats(np.concatenate([np.ravel(r[k]) for r in runs])) for k in keys}
    div = np.concatenate([np.ravel(r["diverged"]) for r in runs])
    out["diverged"] = int(div.sum())
    out["runs"] = int(div.size)
    return out


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-").replace("e+0", "e")


def _summaries(raw: Sequence[tuple[dict, dict]], learned_names: list[str]) -> dict[str, Any]:
    """Optimizer -> `_summary` over the tasks of `raw` (Adam: its chosen grid entries)."""
    out = {n: _summary([r[n] for r, _ in raw]) for n in learned_names}
    out[ADAM] = _summary([r[ADAM]["best"] for r, _ in raw])
    out[ADAM_TRAIN] = _summary([r[ADAM]["best_train"] for r, _ in raw])
    return out


def _labels(learned_names: list[str], per_task: Sequence[dict]) -> dict[str, str]:
    """Table row names; Adam is tuned per task, so its rows name every rate chosen among
    `per_task` (once if they agree)."""
    labels = {n: n for n in learned_names}
    for name, text in ((ADAM, "tuned"), (ADAM_TRAIN, "tuned on train loss")):
        chosen = [t["optimizers"][name]["lr"] for t in per_task]
        uniq = list(dict.fromkeys(_fmt_lr(lr) for lr in chosen))
        labels[name] = f"adam ({text}, lr={', '.join(uniq)})"
    return labels


def _assemble(tasks, raw, learned_names, config: EvalConfig, num_steps: int) -> dict[str, Any]:
    names = [*learned_names, ADAM, ADAM_TRAIN]
    per_task = []
    for (_, info), (runs, seconds) in zip(tasks, raw, strict=True):
        adam = runs[ADAM]
        entry = {"info": info, "optimizers": {}}
        for name in learned_names:
            entry["optimizers"][name] = {
                "seeds": _seed_table(runs[name]),
                "summary": _summary([runs[name]]),
                "seconds": seconds[name],
            }
        best = int(adam["best_index"])
        entry["optimizers"][ADAM] = {
            "lr": float(config.adam_lrs[best]),  # exact, not the float32 copy
            "lr_index": best,
            "all_diverged": bool(adam["all_diverged"]),
            # A rate at the end of the grid means the optimum may lie outside it.
            "at_grid_edge": len(config.adam_lrs) > 1 and best in (0, len(config.adam_lrs) - 1),
            "seeds": _seed_table(adam["best"]),
            "summary": _summary([adam["best"]]),
            "seconds": seconds[ADAM],
            "grid": [
                {
                    "lr": float(lr),
                    "score": _num(adam["score"][j]),
                    "seeds": _seed_table(jax.tree.map(lambda x, j=j: x[j], adam["grid"])),
                }
                for j, lr in enumerate(config.adam_lrs)
            ],
        }
        best_train = int(adam["best_train_index"])
        entry["optimizers"][ADAM_TRAIN] = {
            "lr": float(config.adam_lrs[best_train]),
            "lr_index": best_train,
            "seeds": _seed_table(adam["best_train"]),
            "summary": _summary([adam["best_train"]]),
        }
        per_task.append(entry)

    summary = _summaries(raw, learned_names)
    kinds = [task_kind(info) for _, info in tasks]
    summary_by_kind = {
        kind: _summaries([r for r, k in zip(raw, kinds, strict=True) if k == kind], learned_names)
        for kind in dict.fromkeys(kinds)  # in order of first appearance
    }
    chosen = [t["optimizers"][ADAM]["lr"] for t in per_task]
    labels = _labels(learned_names, per_task)
    warns = [
        f"task {i}: Adam's chosen lr {t['optimizers'][ADAM]['lr']:g} is at the edge of the grid"
        for i, t in enumerate(per_task)
        if t["optimizers"][ADAM]["at_grid_edge"]
    ]
    warns += [
        f"task {i}: Adam diverged at every lr"
        for i, t in enumerate(per_task)
        if t["optimizers"][ADAM]["all_diverged"]
    ]
    return {
        "warnings": warns,
        "config": {
            "num_tasks": len(tasks),
            "num_seeds": config.num_seeds,
            "num_steps": num_steps,
            "adam_lrs": list(config.adam_lrs),
            "eval_every": config.eval_every,
        },
        "eval_steps": eval_steps(num_steps, config.eval_every),
        "optimizers": names,
        "labels": labels,
        "adam_lrs_chosen": chosen,
        "summary": summary,
        "summary_by_kind": summary_by_kind,
        "tasks": per_task,
        "note": "non-finite numbers are written as null; 'diverged' flags those runs",
    }


def _cell(stat: dict[str, Any]) -> str:
    m, s = stat["mean"], stat["std"]
    if m is None or s is None:
        return "nan (diverged)" if not stat["all_finite"] else "nan"
    return f"{m:.4f} ± {s:.4f}"


def _markdown(
    rows: list[tuple[str, dict[str, Any]]], columns: Sequence[tuple[str, str]] = _COLUMNS
) -> str:
    head = ["optimizer", *(c for _, c in columns), "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label, summ in rows:
        cells = [_cell(summ[k]) if k in summ else "n/a" for k, _ in columns]
        cells.append(f"{summ['diverged']}/{summ['runs']}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_table(results: dict[str, Any], per_task: bool = False) -> str:
    """Markdown table of mean ± std over tasks × seeds, one row per optimizer.

    Tasks of one kind give one table. Tasks of several kinds (losses in different units)
    give one table per kind, each under a heading "### kind: K (N tasks)". Language-model
    tables show test bits per byte where classification tables show test accuracy.

    Args:
      results: the dict `run_suite` returns (or its results.json, loaded).
      per_task: also append one table per task (Adam's row names that task's rate).

    Returns:
      The markdown text.
    """
    names, labels = results["optimizers"], results["labels"]
    by_kind = results.get("summary_by_kind") or {}  # absent from older results.json
    tasks = results.get("tasks", [])
    learned = [n for n in names if n not in (ADAM, ADAM_TRAIN)]
    if len(by_kind) > 1:
        parts = []
        for kind, summ in by_kind.items():
            mine = [t for t in tasks if task_kind(t["info"]) == kind]
            kind_labels = _labels(learned, mine) if mine else labels
            n = len(mine)
            parts.append(
                f"### kind: {kind} ({n} task{'' if n == 1 else 's'})\n\n"
                + _markdown([(kind_labels[o], summ[o]) for o in names], _columns(kind))
            )
        text = "\n".join(parts)
    else:
        kind = next(iter(by_kind), DEFAULT_KIND)
        text = _markdown([(labels[n], results["summary"][n]) for n in names], _columns(kind))
    if per_task:
        for i, t in enumerate(results["tasks"]):
            rows = []
            for n in names:
                opt = t["optimizers"][n]
                label = {
                    ADAM: f"adam (tuned, lr={_fmt_lr(opt.get('lr', 0))})",
                    ADAM_TRAIN: f"adam (tuned on train loss, lr={_fmt_lr(opt.get('lr', 0))})",
                }.get(n, n)
                rows.append((label, opt["summary"]))
            head = f"\n### Task {i}: {json.dumps(t['info'], sort_keys=True)}\n\n"
            text += head + _markdown(rows, _columns(task_kind(t["info"])))
    return text


def write_outputs(results: dict[str, Any], out_dir: str) -> None:
    """Writes results.json, results.md and curves.png of `run_suite`'s results into `out_dir`.

    Args:
      results: the dict `run_suite` returns.
      out_dir: the directory (created if missing).
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, allow_nan=False)  # compact: curves are long lists
    cfg = results["config"]
    md = (
        f"# Evaluation: {cfg['num_tasks']} held-out tasks × {cfg['num_seeds']} seeds, "
        f"{cfg['num_steps']} steps\n\n"
        "Mean ± std over tasks × seeds of full-split metrics after training (train, valid, "
        "test loss and test accuracy, or test bits per byte for language models) and of the "
        "mean minibatch training loss over the run. Adam's learning "
        f"rate is tuned per task over {cfg['adam_lrs']} on mean final validation loss; the "
        "'tuned on train loss' row picks it on final training loss instead.\n\n"
    )
    if len(results.get("summary_by_kind") or {}) > 1:
        md += "Tasks of different kinds are summarised in separate tables (losses differ).\n\n"
    if results.get("warnings"):
        md += "".join(f"> warning: {w}\n" for w in results["warnings"]) + "\n"
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(md + format_table(results, per_task=True))
    plot_curves(results, os.path.join(out_dir, "curves.png"))


def _smooth(y: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Moving average; returns (x, y) with x the step at each window's end."""
    window = max(1, min(window, len(y)))
    ys = np.convolve(y, np.ones(window) / window, mode="valid")
    return np.arange(window - 1, len(y)), ys


def _as_float(x: Any) -> np.ndarray:
    return np.array(x, dtype=np.float64)  # None (non-finite) -> nan


def plot_curves(results: dict[str, Any], path: str) -> None:
    """Plots the smoothed mean training loss and validation losses, one subplot per task.

    Args:
      results: the dict `run_suite` returns.
      path: the PNG file to write.
    """
    # The object-oriented API renders with Agg and leaves pyplot's global state alone.
    from matplotlib.figure import Figure  # noqa: PLC0415 - matplotlib is slow to import

    tasks, names = results["tasks"], results["optimizers"]
    n = len(tasks)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig = Figure(figsize=(5.5 * cols, 4.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    steps = np.asarray(results["eval_steps"])
    window = max(1, results["config"]["num_steps"] // 50)
    for i, (ax, t) in enumerate(zip(axes, tasks, strict=False)):
        _plot_task(ax, t, i, names, steps, window)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.savefig(path, dpi=110)


def _plot_task(ax, t: dict, i: int, names: list[str], steps: np.ndarray, window: int) -> None:
    positive = True
    for j, name in enumerate(names):
        opt = t["optimizers"][name]
        label = {
            ADAM: f"adam (lr={_fmt_lr(opt.get('lr', 0))})",
            ADAM_TRAIN: f"adam, train-tuned (lr={_fmt_lr(opt.get('lr', 0))})",
        }.get(name, name)
        ndiv = sum(opt["seeds"]["diverged"])
        if ndiv:
            label += f" [{ndiv} diverged]"
        with warnings.catch_warnings():
            # A step where every seed diverged has an all-NaN mean: plotted as a gap.
            warnings.simplefilter("ignore", RuntimeWarning)
            x, y = _smooth(np.nanmean(_as_float(opt["seeds"]["train_curve"]), axis=0), window)
            valid = np.nanmean(_as_float(opt["seeds"]["valid_curve"]), axis=0)
        ax.plot(x, y, color=f"C{j}", label=f"{label} train (smoothed)")
        ax.plot(steps, valid, "o--", color=f"C{j}", ms=3, lw=0.8, label=f"{label} valid")
        finite = np.concatenate([y[np.isfinite(y)], valid[np.isfinite(valid)]])
        positive &= bool(finite.size) and bool((finite > 0).all())
    if positive:  # cross-entropy spans decades over training
        ax.set_yscale("log")
    info = t["info"]
    title = ", ".join(f"{k}={info[k]}" for k in ("kind", "dataset", "activation") if k in info)
    ax.set_title(f"task {i}" + (f": {title}" if title else ""), fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
