"""The speed-up metric of optimizer benchmarks, and its summaries across tasks.

The speed-up of a candidate over a reference (VeLO, Metz et al. 2022, sec. 4; AlgoPerf's
time-to-target, Dahl et al. 2023) is

    steps the reference needs to reach its own best loss
    ---------------------------------------------------- ,
    steps the candidate needs to reach that same loss

read off loss curves recorded at given steps: > 1 means the candidate gets there sooner,
`None` means it never gets there within the run. The reference's step is the first
recorded step at its minimum; the candidate's is interpolated linearly between the two
recorded steps around its first crossing, so identical curves give exactly 1.

Everything here is plain numpy on host curves (means over seeds); nothing is traced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Aggregates count "never reaches" as this speed-up: the worst possible outcome.
NEVER = 0.0


def steps_to_reach(steps: Sequence[float], curve: Sequence[float], target: float) -> float | None:
    """The first step at which `curve` gets down to `target`, interpolated between records.

    Args:
      steps: increasing steps at which the curve was recorded.
      curve: the loss at those steps (NaN or inf: not reached there, e.g. a diverged run).
      target: the loss to reach.

    Returns:
      The (fractional) step, or None if no finite recorded value is <= target.
    """
    s = np.asarray(steps, np.float64)
    c = np.asarray(curve, np.float64)
    if s.shape != c.shape or s.ndim != 1:
        raise ValueError(f"steps {s.shape} and curve {c.shape} must be 1-D of one length")
    if not np.isfinite(target):
        return None
    hit = np.flatnonzero(np.isfinite(c) & (c <= target))
    if hit.size == 0:
        return None
    i = int(hit[0])
    if i == 0 or not np.isfinite(c[i - 1]):
        return float(s[i])
    # c[i-1] > target >= c[i]: the straight line between them crosses target once.
    frac = (c[i - 1] - target) / (c[i - 1] - c[i])
    return float(s[i - 1] + frac * (s[i] - s[i - 1]))


def reference_point(steps: Sequence[float], curve: Sequence[float]) -> tuple[float, float] | None:
    """The reference's best recorded loss and the first step where it reaches it.

    Args:
      steps: recorded steps.
      curve: the reference's loss there.

    Returns:
      `(step, loss)`, or None when the curve has no finite value (a diverged reference).
    """
    c = np.asarray(curve, np.float64)
    finite = np.isfinite(c)
    if not finite.any():
        return None
    i = int(np.argmin(np.where(finite, c, np.inf)))
    return float(np.asarray(steps, np.float64)[i]), float(c[i])


def speed_up(
    steps: Sequence[float], reference: Sequence[float], candidate: Sequence[float]
) -> dict[str, float | None]:
    """Speed-up of `candidate` over `reference` on curves recorded at the same `steps`.

    Args:
      steps: recorded steps (the first is usually 0, the initial parameters).
      reference: the reference optimizer's loss curve.
      candidate: the candidate's loss curve.

    Returns:
      `speed_up` (None: never reaches, or the reference has no finite point), `target` (the
      reference's best loss), `reference_steps` and `candidate_steps` (steps to the target;
      candidate None when it never reaches it). A reference whose best is its initial
      loss (step 0) gives speed-up 1 to any candidate that starts there too, and None
      ("never") otherwise.
    """
    ref = reference_point(steps, reference)
    if ref is None:
        return {"speed_up": None, "target": None, "reference_steps": None, "candidate_steps": None}
    ref_steps, target = ref
    cand_steps = steps_to_reach(steps, candidate, target)
    if cand_steps is None:
        ratio = None
    elif cand_steps == 0.0:
        ratio = 1.0 if ref_steps == 0.0 else float("inf")
    else:
        ratio = ref_steps / cand_steps
    return {
        "speed_up": ratio,
        "target": target,
        "reference_steps": ref_steps,
        "candidate_steps": cand_steps,
    }


def smooth_bins(losses: np.ndarray, num_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Minibatch losses averaged over equal bins of steps, for a train-loss curve.

    Args:
      losses: [..., num_steps] per-step minibatch losses (leading axes: seeds, ...).
      num_bins: bins of (within one step) equal size; clipped to num_steps.

    Returns:
      `(steps, curve)`: the step at each bin's end and the [..., bins] bin means.
    """
    losses = np.asarray(losses, np.float64)
    return coarsen(np.arange(1, losses.shape[-1] + 1), losses, num_bins)


def coarsen(
    steps: Sequence[float], curve: Sequence[float], bins: int
) -> tuple[np.ndarray, np.ndarray]:
    """A binned training curve merged into at most `bins` bins (consecutive bins averaged).

    The training-loss speed-up reads a minimum off the curve; on fine bins of minibatch
    losses that minimum is mostly noise (tuned Adam against fresh seeds of itself then
    "never" reaches it), on bins of ~5 % of the run it is the trend.

    Args:
      steps: each fine bin's end step.
      curve: the fine bins' values (NaN allowed: it propagates).
      bins: the most bins to keep.

    Returns:
      `(steps, curve)`: each merged bin's end step and mean.
    """
    s = np.asarray(steps, np.float64)
    c = np.asarray(curve, np.float64)
    n = c.shape[-1]
    b = max(1, min(int(bins), n))
    edges = np.linspace(0, n, b + 1).round().astype(int)
    merged = np.stack(
        [c[..., a:e].mean(-1) for a, e in zip(edges[:-1], edges[1:], strict=True)], -1
    )
    return s[edges[1:] - 1], merged


def interquartile_mean(values: Sequence[float]) -> float | None:
    """Mean of the middle half of `values` (25 % trimmed each side, fractional weights).

    Agarwal et al. 2021 ("Deep RL at the edge of the statistical precipice"): robust like
    the median, less noisy. Returns None for no values.
    """
    v = np.sort(np.asarray(values, np.float64))
    n = v.size
    if n == 0:
        return None
    # Weight of each sorted value in the middle half, with fractional ends for n % 4 != 0.
    lo, hi = 0.25 * n, 0.75 * n
    idx = np.arange(n)
    w = np.clip(np.minimum(idx + 1, hi) - np.maximum(idx, lo), 0.0, 1.0)
    return float(np.sum(w * v) / np.sum(w))


def aggregate(speed_ups: Sequence[float | None]) -> dict[str, float | int | None]:
    """Summary across tasks of per-task speed-ups (None: never reached, counted as 0).

    Args:
      speed_ups: one per task; None where the candidate never reached the target.

    Returns:
      `median`, `iqm` (interquartile mean), `win_rate` (share of tasks with speed-up >= 1),
      `never` (count of None), `tasks` (count). Median and IQM are None without tasks.
    """
    vals = [NEVER if s is None else float(s) for s in speed_ups]
    n = len(vals)
    return {
        "median": float(np.median(vals)) if n else None,
        "iqm": interquartile_mean(vals),
        "win_rate": float(np.mean([v >= 1.0 for v in vals])) if n else None,
        "never": sum(s is None for s in speed_ups),
        "tasks": n,
    }
