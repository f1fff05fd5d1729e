"""The meta-training job's wandb run, offline, read back from its transaction log: charts
against the outer step, the evaluation's table and figure, and the best meta-parameters as
an Artifact that loads again by name:version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from lopt.checkpoint import load_theta
from lopt.export import (
    ARTIFACT_TYPE,
    _copy_offline_artifact,
    load_optax_artifact,
    wandb_run_records,
)
from meta_train.logging import RunLogger
from meta_train.main import eval_table, main

ROOT = Path(__file__).resolve().parents[1]
TINY = [  # as tests/test_meta_train.py's TINY, with wandb offline, validation and evaluation
    "task_family.hidden_sizes=[[16]]",
    "task_family.batch_sizes=[32]",
    "task_family.activations=['relu']",
    "meta.num_pairs=4",
    "meta.window=10",
    "meta.min_episode_len=50",
    "meta.max_episode_len=50",
    "meta.task_groups=1",
    "meta.outer_steps=4",
    "run.log_every=2",
    "run.wandb_mode=offline",
    "run.name='dash board'",  # a space: the artifact name must replace it
    "valid.every=2",
    "valid.num_tasks=1",
    "valid.num_seeds=1",
    "eval.num_tasks=1",
    "eval.num_seeds=2",
    "eval.adam_lrs=[1e-3, 1e-2]",
    "eval.num_steps=20",
]


def _history(records) -> list[dict]:
    """The run's history rows, nested keys joined with '.' and values decoded."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {}
            for item in r.history.item:
                key = item.key or ".".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


@pytest.mark.slow  # a real main job with validation and evaluation (~17 s)
def test_offline_dashboard_has_outer_step_axis_eval_and_loadable_artifact(
    tmp_path, isolated_env, capsys
):
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "default.toml"), *TINY, f"run.out_dir='{out}'"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "logged as artifact lopt-dash-board:latest" in err

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(wandb_run_records(run_file))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[0] == "header" and "exit" in kinds  # read to the end of the log

    # Charts: the outer step is a metric and the x-axis of every other one.
    metrics = [r.metric for r, k in zip(records, kinds, strict=True) if k == "metric"]
    assert any(m.name == "outer_step" for m in metrics)
    assert any(m.glob_name == "*" and m.step_metric == "outer_step" for m in metrics)
    history = _history(records)
    train_rows = [h for h in history if "meta_loss" in h]
    assert [h["outer_step"] for h in train_rows] == [2, 4]
    assert all(h["outer_step"] == h["_step"] for h in history)
    # metrics.jsonl is unchanged: its step is "step", no outer_step column.
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "meta_loss" in r] == [2, 4]
    assert all("outer_step" not in r for r in lines)

    # The evaluation's table, with results.json's numbers, at the last outer step.
    results = json.loads((out / "eval" / "results.json").read_text())
    (row,) = [h for h in history if "eval/results._type" in h]
    assert row["eval/results._type"] == "table-file" and row["outer_step"] == 4
    run_dir = run_file.parent
    table = json.loads((run_dir / "files" / row["eval/results.path"]).read_text())
    columns, rows = eval_table(results)
    assert table["columns"] == columns
    assert "final_valid_loss mean" in columns and "diverged" in columns
    assert [r[0] for r in table["data"]] == [results["labels"][n] for n in results["optimizers"]]
    adam = results["summary"]["adam"]["final_valid_loss"]
    (adam_row,) = [r for r in table["data"] if r[0] == results["labels"]["adam"]]
    mean_col = columns.index("final_valid_loss mean")
    assert adam_row[mean_col] == pytest.approx(adam["mean"], rel=1e-12)

    # The curves figure, byte for byte.
    (row,) = [h for h in history if "eval/curves._type" in h]
    assert row["eval/curves._type"] == "image-file"
    png = (out / "eval" / "curves.png").read_bytes()
    assert row["eval/curves.sha256"] == hashlib.sha256(png).hexdigest()
    assert (run_dir / "files" / row["eval/curves.path"]).read_bytes() == png

    # The best meta-parameters as an Artifact: the best step, best.json and config.json,
    # with the config (and the best step and score) as metadata.
    best = json.loads((out / "checkpoints" / "best.json").read_text())
    arts = [r.artifact for r, k in zip(records, kinds, strict=True) if k == "artifact"]
    (art,) = [a for a in arts if a.type == ARTIFACT_TYPE]
    assert art.name == "lopt-dash-board"
    assert {"latest", "best", f"step-{best['step']}"} <= set(art.aliases)
    meta = json.loads(art.metadata)
    config = json.loads((out / "config.json").read_text())
    assert {k: meta[k] for k in config} == config
    assert meta["best_step"] == best["step"] and meta["best_score"] == best["score"]
    paths = {e.path for e in art.manifest.contents}
    assert {"best.json", "config.json"} <= paths
    assert {p.split("/")[0] for p in paths} == {str(best["step"]), "best.json", "config.json"}

    # Loaded back by name:version (version number, alias) gives the best step's θ exactly.
    want, _ = load_theta(str(out / "checkpoints"), best["step"])
    for ref in ("lopt-dash-board:latest", "lopt-dash-board:v0", "lopt-dash-board:best"):
        tx, theta, _ = load_optax_artifact(ref, run_dir=str(out))
        leaves, expected = jax.tree.leaves(theta), jax.tree.leaves(want)
        assert len(leaves) == len(expected) > 0
        for a, b in zip(leaves, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="v1.*found: best, latest, step-"):
        load_optax_artifact("lopt-dash-board:v1", run_dir=str(out))
    with pytest.raises(FileNotFoundError, match="no offline wandb artifact"):
        load_optax_artifact("lopt-other:latest", run_dir=str(out))


def test_offline_versions_and_aliases_resolve_as_the_server_numbers_them(tmp_path, isolated_env):
    out, src = tmp_path / "run", tmp_path / "src"
    src.mkdir()

    def log(logger, text, aliases=()):
        (src / "f.txt").write_text(text)  # staged (copied) when added: rewriting is safe
        files = {"f.txt": src / "f.txt"}
        logger.log_artifact("lopt-x", ARTIFACT_TYPE, files, {"text": text}, aliases)

    config = {"run": {"name": "x"}}
    with RunLogger(str(out), config) as logger:
        log(logger, "a", ["first"])
        log(logger, "b", ["best"])
    with RunLogger(str(out), config, resume=True) as logger:  # a second offline run folder
        log(logger, "a")  # the same content again is no new version
        log(logger, "c")
    assert len(list((out / "wandb").glob("offline-run-*"))) == 2

    def read(version):
        dest = tmp_path / "read" / version
        _copy_offline_artifact(str(out), "lopt-x", version, None, str(dest))
        return (dest / "f.txt").read_text()

    versions = ("v0", "v1", "v2", "first", "best", "latest")
    assert [read(v) for v in versions] == ["a", "b", "c", "a", "b", "c"]
    with pytest.raises(FileNotFoundError, match="v3"):
        read("v3")
    # A staged file that changed after logging is refused, not loaded.
    (first,) = [
        r.artifact
        for f in (out / "wandb").glob("offline-run-*/run-*.wandb")
        for r in wandb_run_records(f)
        if r.HasField("artifact") and "first" in r.artifact.aliases
    ]
    Path(first.manifest.contents[0].local_path).write_text("tampered")
    with pytest.raises(ValueError, match="changed since logging"):
        read("first")
