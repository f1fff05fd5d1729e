"""evaluate.measure.plot_runs: block statistics and validation scores of runs, and the figure."""

import json

import numpy as np

from evaluate.measure.plot_runs import main, read_run


def _write_run(path, steps, with_valid=True):
    path.mkdir(parents=True)
    lines = []
    for s in steps:
        lines.append({"step": s, "meta_loss": s / 100, "estimate_variance": float(s)})
        if with_valid and s % 20 == 0:
            lines.append({"step": s, "valid/score": 1.0 / s})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


def test_blocks_and_scores(tmp_path):
    _write_run(tmp_path / "a", range(10, 101, 10))
    r = read_run(tmp_path / "a", block=50)
    np.testing.assert_array_equal(r["step"], [50, 100])
    np.testing.assert_allclose(r["meta_loss"], [0.3, 0.8])  # means of 0.1..0.5, 0.6..1.0
    np.testing.assert_allclose(r["variance"], [30.0, 80.0])  # medians
    np.testing.assert_array_equal(r["valid_step"], [20, 40, 60, 80, 100])
    # A run trained before meta-validation: scores from scripts/validate_checkpoints.py.
    _write_run(tmp_path / "b", range(10, 51, 10), with_valid=False)
    scores = [{"step": 0, "score": 1.3}, {"step": 50, "score": 0.9}]
    (tmp_path / "b" / "valid_scores.json").write_text(json.dumps({"scores": scores}))
    r = read_run(tmp_path / "b", block=50)
    np.testing.assert_allclose(r["valid_score"], [1.3, 0.9])


def test_cli_writes_the_figure(tmp_path, capsys):
    _write_run(tmp_path / "a", range(10, 101, 10))
    _write_run(tmp_path / "b", range(10, 101, 10))
    out = tmp_path / "runs.png"
    assert main([f"{tmp_path / 'a'}=first", str(tmp_path / "b"), "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000 and "wrote" in capsys.readouterr().out
