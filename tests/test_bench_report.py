"""Tests of evaluate.bench.report on a small hand-made results dict (no training)."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from evaluate.bench import report as br

ROWS = ["cand", "adam", "adam_cosine", "sgdm", "adam_fresh_seeds"]
LRS = [1e-4, 1e-3, 1e-2]


def _stat(seeds):
    """`{"mean", "std", "seeds"}` as the benchmark writes it (None: non-finite)."""
    if any(s is None for s in seeds):
        return {"mean": None, "std": None, "seeds": list(seeds)}
    return {"mean": float(np.mean(seeds)), "std": float(np.std(seeds)), "seeds": list(seeds)}


def _su(speed_up, target=0.5, ref=100.0):
    """A speed-up entry; speed_up None means "never reaches"."""
    return {
        "speed_up": speed_up,
        "target": target,
        "reference_steps": ref,
        "candidate_steps": None if speed_up is None else ref / speed_up,
    }


def _run(scale, valid_su, train_su, *, lm=False, diverged=0, ratio=1.0):
    """A row's run on one task: curves decay from 2.3 towards `scale`."""
    valid = [2.3, 2.3 * scale, 1.15 * scale]
    train = [2.0, 1.5 * scale, 1.2 * scale, 1.1 * scale]
    seeds = [1.0 * scale, 1.1 * scale, 1.2 * scale]
    if diverged:
        seeds[1] = None
    final = {
        f"{split}_loss": _stat([s + i * 0.01 if s is not None else None for s in seeds])
        for i, split in enumerate(("train", "valid", "test"))
    }
    for split in ("train", "valid", "test"):
        final[f"{split}_accuracy"] = _stat([0.81, 0.82, 0.83])
        if lm:
            final[f"{split}_bits_per_byte"] = _stat([1.2345, 1.2346, 1.2347])
    return {
        "final": final,
        "valid_curve": {"mean": valid, "seeds": [valid] * 3},
        "train_curve": {"mean": train, "seeds": [train] * 3},
        "diverged": diverged,
        "runs": 3,
        "speed_up_valid": valid_su,
        "speed_up_train": train_su,
        "step_time_ratio": ratio,
    }


def _baseline(lr_index, *, all_diverged=False):
    return {
        "lrs": LRS,
        "scores": [None if all_diverged else 1.0 + abs(i - lr_index) for i in range(3)],
        "lr": LRS[lr_index],
        "lr_index": lr_index,
        "at_grid_edge": lr_index in (0, 2),
        "all_diverged": all_diverged,
        "cached": False,
        "seconds": 1.5,
    }


def _agg(valid, train, diverged, runs, ratio, wall=None):
    return {"valid": valid, "train": train, "diverged": diverged, "runs": runs,
            "step_time_ratio_median": ratio, "wall_valid": wall or {}}  # fmt: skip


def _split(median, iqm, win_rate, never, tasks=2):
    return {"median": median, "iqm": iqm, "win_rate": win_rate, "never": never, "tasks": tasks}


def make_results():
    mlp = {
        "name": "mlp-fashion_mnist@100",
        "kind": "mlp",
        "steps": 100,
        "description": "MLP 128-128 relu, batch 128, Fashion-MNIST 28x28",
        "metric": "accuracy",
        "eval_steps": [0, 50, 100],
        "train_steps": [25, 50, 75, 100],
        "baselines": {
            "adam": _baseline(2),  # at the top of its grid: warned about
            "adam_cosine": _baseline(1),
            "sgdm": _baseline(1),
        },
        "runs": {
            "cand": _run(0.3, _su(2.0), _su(1.5), ratio=1.4),
            "adam": _run(0.4, _su(1.0), _su(1.0)),
            "adam_cosine": _run(0.45, _su(0.8), _su(0.9), ratio=1.01),
            "sgdm": _run(0.9, _su(None), _su(None), ratio=0.95),  # never reaches Adam's best
            "adam_fresh_seeds": _run(0.41, _su(0.95), _su(1.02)),
        },
    }
    lm = {
        "name": "lm-tiny@100",
        "kind": "lm",
        "steps": 100,
        "description": "Transformer LM, 2 layers, bytes",
        "metric": "bits_per_byte",
        "eval_steps": [0, 50, 100],
        "train_steps": [25, 50, 75, 100],
        "baselines": {
            "adam": _baseline(1),
            "adam_cosine": _baseline(1),
            "sgdm": _baseline(0, all_diverged=True),
        },
        "runs": {
            # One seed diverged: its final losses are null, the mean too.
            "cand": _run(0.5, _su(3.0), _su(None), lm=True, diverged=1, ratio=1.6),
            "adam": _run(0.6, _su(1.0), _su(1.0), lm=True),
            "adam_cosine": _run(0.62, _su(1.1), _su(0.7), lm=True, ratio=1.02),
            # sgdm is missing: it failed (see "failed").
            "adam_fresh_seeds": _run(0.61, _su(1.05), _su(0.98), lm=True),
        },
    }
    return {
        "suite": "classic",
        "config": {
            "seeds": 3,
            "eval_points": 3,
            "train_bins": 4,
            "workers": 1,
            "steps_override": None,
            "versions": {"jax": "0.0.test"},
            "cache_dir": "/tmp/none",
            "started": "2024-01-01T00:00:00",
        },
        "candidates": ["cand"],
        "rows": ROWS,
        "row_labels": {
            "cand": "cand",
            "adam": "Adam (tuned)",
            "adam_cosine": "Adam warm-up+cosine (tuned)",
            "sgdm": "SGD momentum 0.9 (tuned)",
            "adam_fresh_seeds": "Adam (tuned), fresh seeds",
        },
        "skipped": [{"task": "mlp-mnist@100", "reason": "dataset 'mnist' not found: /data/x"}],
        "failed": [{"task": "lm-tiny@100", "row": "sgdm", "error": "RuntimeError: boom"}],
        "tasks": [mlp, lm],
        "aggregate": {
            "cand": _agg(
                _split(2.5, 2.5, 1.0, 0),
                _split(0.75, 0.75, 0.5, 1),
                1,
                6,
                1.5,
                _split(1.67, 1.67, 1.0, 0),
            ),
            "adam": _agg(_split(1.0, 1.0, 1.0, 0), _split(1.0, 1.0, 1.0, 0), 0, 6, 1.0),
            "adam_cosine": _agg(_split(0.95, 0.95, 0.5, 0), _split(0.8, 0.8, 0.0, 0), 0, 6, 1.015),
            "sgdm": _agg(_split(0.0, 0.0, 0.0, 1, 1), _split(0.0, 0.0, 0.0, 1, 1), 0, 3, 0.95),
            "adam_fresh_seeds": _agg(_split(1.0, 1.0, 0.5, 0), _split(1.0, 1.0, 0.5, 0), 0, 6, 1.0),
        },
        "wall_time_s": 125.0,
    }


@pytest.fixture
def restore_wandb_env():
    """Puts back the WANDB_* variables RunLogger sets (it points them into out_dir)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("WANDB_")}
    yield
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        if k not in saved:
            del os.environ[k]
    os.environ.update(saved)


def _row(md: str, section: str, first_cell: str) -> list[str]:
    """The cells of the table line starting with `first_cell` after heading `section`."""
    text = md[md.index(section) :]
    for line in text.splitlines():
        if line.startswith(f"| {first_cell} |"):
            return [c.strip() for c in line.strip().strip("|").split(" | ")]
    raise AssertionError(f"no row {first_cell!r} after {section!r}")


def test_format_markdown_numbers():
    results = make_results()
    md = br.format_markdown(results)

    assert "suite `classic`" in md and "3 seeds, 2 tasks (1 skipped), wall time 2m05s" in md
    # Summary: median, IQM (valid, train), win rates, never counts, diverged, step time.
    assert _row(md, "## Summary", "cand")[1:] == [
        "2.50×", "2.50×", "0.75×", "0.75×", "100% / 50%", "0 / 1 of 2", "1/6", "1.50×", "1.67×",
    ]  # fmt: skip
    assert _row(md, "## Summary", "Adam (tuned)")[-1] == "n/a"  # no wall time given
    assert _row(md, "## Summary", "Adam (tuned)")[1] == "1.00×"

    # Per task: valid (train) speed-ups; "never"; the failed run as n/a; Adam itself 1.00×.
    mlp = _row(md, "## Speed-up per task", "mlp-fashion_mnist@100")
    assert mlp[1:] == [
        "2.00× (train 1.50×)",
        "1.00× (train 1.00×)",
        "0.80× (train 0.90×)",
        "never (train never)",
        "0.95× (train 1.02×)",
    ]
    lm = _row(md, "## Speed-up per task", "lm-tiny@100")
    assert lm[1] == "3.00× (train never)" and lm[4] == "n/a"

    # Final metrics: the LM table shows bits per byte, the MLP table accuracy.
    lm_table = md[md.index("### lm-tiny@100") :]
    assert "test bits/byte" in lm_table.split("\n\n")[2].splitlines()[0]
    mlp_table = md[md.index("### mlp-fashion_mnist@100") : md.index("### lm-tiny@100")]
    assert "| test acc |" in mlp_table and "bits/byte" not in mlp_table
    cand_lm = _row(md, "### lm-tiny@100", "cand")
    # Train loss seeds have a null: mean n/a flagged diverged; accuracy column replaced.
    assert cand_lm[1] == "nan (diverged)" and cand_lm[4] == "1.2346 ± 0.0001"
    assert cand_lm[5:] == ["1/3", "1.60×"]
    assert _row(md, "### lm-tiny@100", "SGD momentum 0.9 (tuned)")[1:] == ["n/a"] * 6
    assert _row(md, "### mlp-fashion_mnist@100", "cand")[1] == "0.3300 ± 0.0245"

    # Baselines: chosen rates, the edge marker and its warning, an all-diverged baseline.
    assert _row(md, "## Tuned baselines", "mlp-fashion_mnist@100")[1:] == [
        "1e-2 (edge)", "1e-3", "1e-3",
    ]  # fmt: skip
    assert _row(md, "## Tuned baselines", "lm-tiny@100")[3] == "all diverged"
    assert (
        "task mlp-fashion_mnist@100: adam's best lr 1e-2 is at the edge of its grid "
        "[1e-4, 1e-3, 1e-2] (the highest); the optimum may lie outside"
    ) in md
    assert "lm-tiny@100: sgdm diverged at every lr" in md

    assert "- mlp-mnist@100: dataset 'mnist' not found: /data/x" in md
    assert "- lm-tiny@100, SGD momentum 0.9 (tuned): RuntimeError: boom" in md
    assert "How to read" in md and "Adam (tuned), fresh seeds" in md.split("How to read")[1]


def test_speed_up_kinds():
    assert br.speed_up_kind(_su(1.5)) == ("value", 1.5)
    assert br.speed_up_kind(_su(None)) == ("never", None)
    assert br.speed_up_kind(None) == ("n/a", None)
    # Reached at step 0 while Adam was not: +inf, written as null with candidate_steps 0.
    assert br.speed_up_kind({**_su(None), "candidate_steps": 0.0}) == ("inf", None)
    # Adam had no finite point: nothing to compare.
    assert br.speed_up_kind({**_su(None), "target": None, "reference_steps": None})[0] == "n/a"


def _check_png(path, min_side=200):
    from matplotlib.image import imread  # noqa: PLC0415 - slow import

    img = imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) >= min_side
    assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas


def test_plots(tmp_path):
    results = make_results()
    br.plot_speedups(results, str(tmp_path / "speedup.png"))
    _check_png(tmp_path / "speedup.png")

    paths = br.plot_task_curves(results, str(tmp_path / "curves"))
    assert [os.path.basename(p) for p in paths] == ["mlp-fashion_mnist_100.png", "lm-tiny_100.png"]
    for p in paths:
        _check_png(p)
    assert br.task_file_name("a/b c@1") == "a_b_c_1"


def test_write_report_offline(tmp_path, restore_wandb_env):
    results = make_results()
    original = copy.deepcopy(results)
    out = tmp_path / "report"
    written = br.write_report(results, str(out), wandb_mode="offline")

    assert results == original  # the input is not modified
    with open(out / "results.json") as f:
        assert json.load(f) == original
    assert "never" in (out / "results.md").read_text()
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and written["wandb"] == str(runs[0])
    assert list(runs[0].glob("run-*.wandb"))
    assert sorted(k for k in written if k.startswith("curves/")) == [
        "curves/lm-tiny_100.png", "curves/mlp-fashion_mnist_100.png",
    ]  # fmt: skip
    for name, path in written.items():
        assert os.path.exists(path), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["speed_up_valid_median/cand"] == 2.5
    assert summary["never_train/cand"] == 1 and summary["num_skipped"] == 1
    assert summary["wall_speed_up_valid_median/cand"] == 1.67


def test_write_report_disabled_and_strict_json(tmp_path, restore_wandb_env):
    out = tmp_path / "report"
    written = br.write_report(make_results(), str(out), wandb_mode="disabled")
    assert "wandb" not in written and not (out / "wandb").exists()
    assert (out / "speedup.png").exists() and (out / "results.md").exists()

    bad = make_results()
    bad["wall_time_s"] = float("nan")
    with pytest.raises(ValueError):
        br.write_report(bad, str(tmp_path / "bad"), wandb_mode="disabled")
    assert not (tmp_path / "bad" / "results.json").exists()
