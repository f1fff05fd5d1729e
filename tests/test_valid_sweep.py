"""`evaluate.measure.valid_sweep`: an option chosen on a run's meta-validation tasks."""

import json

import pytest

from evaluate.measure import valid_sweep
from meta_train.cli import USAGE_ERROR
from meta_train.cli import main as cli_main


@pytest.mark.slow  # 50 s: the default stage is close to its 10 minutes
def test_sweeps_an_option_on_the_shipped_checkpoints_validation_tasks(tmp_path):
    out = tmp_path / "rows.json"
    valid_sweep.main(
        [
            "checkpoints/mnist1d-mlp-pes",
            "--option",
            "weight_decay",
            "--values",
            "0",
            "1e-2",
            "--seeds",
            "1",
            "--out",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())
    assert [r["weight_decay"] for r in rows] == [0.0, 1e-2]
    # a different rule gives a different score; both finite, both against the same Adam
    assert rows[0]["score"] != rows[1]["score"]
    assert all(0 < r["score"] < 10 for r in rows)

    # A decay per epoch: each task's own weight_decay = value / its steps per epoch. At 0 it
    # is the rule without decay, so the same runs as weight_decay 0 and the same score.
    per_epoch = tmp_path / "per_epoch.json"
    args = ["--option", "weight_decay_per_epoch", "--values", "0", "0.3", "--seeds", "1"]
    valid_sweep.main(["checkpoints/mnist1d-mlp-pes", *args, "--out", str(per_epoch)])
    epoch_rows = json.loads(per_epoch.read_text())
    assert [r["weight_decay_per_epoch"] for r in epoch_rows] == [0.0, 0.3]
    assert epoch_rows[0]["score"] == rows[0]["score"]
    assert epoch_rows[1]["score"] != rows[0]["score"]
    assert all(n > 1 for n in epoch_rows[1]["steps_per_epoch"])  # one per validation task

    # Another option swept with that decay held: a cap of 0 (none) is the same rule, so the
    # same runs as the decay per epoch alone.
    held = tmp_path / "held.json"
    args = ["--option", "width_scale_max", "--values", "0", "--seeds", "1"]
    valid_sweep.main(
        ["checkpoints/mnist1d-mlp-pes", *args, "--per-epoch-decay", "0.3", "--out", str(held)]
    )
    (held_row,) = json.loads(held.read_text())
    assert held_row["score"] == epoch_rows[1]["score"]
    assert held_row["steps_per_epoch"] == epoch_rows[1]["steps_per_epoch"]

    # A floor under the decay per epoch: with no decay per epoch, a floor of 1e-2 is a fixed
    # decay of 1e-2 on every task, the second row above.
    floor = tmp_path / "floor.json"
    args = ["--option", "weight_decay_floor", "--values", "1e-2", "--per-epoch-decay", "0"]
    valid_sweep.main(["checkpoints/mnist1d-mlp-pes", *args, "--seeds", "1", "--out", str(floor)])
    (floor_row,) = json.loads(floor.read_text())
    assert floor_row["score"] == rows[1]["score"]

    # How fast the decay per epoch falls with the data's size: exponent 1 is the decay per
    # epoch itself (the second per-epoch row); 0.5 from an anchor below every task's steps
    # per epoch decays more, another score.
    exponent = tmp_path / "exponent.json"
    args = ["--option", "weight_decay_epoch_exponent", "--values", "1", "0.5"]
    args += ["--per-epoch-decay", "0.3", "--min-steps-per-epoch", "2", "--seeds", "1"]
    valid_sweep.main(["checkpoints/mnist1d-mlp-pes", *args, "--out", str(exponent)])
    exp_rows = json.loads(exponent.read_text())
    assert exp_rows[0]["score"] == epoch_rows[1]["score"]
    assert exp_rows[1]["score"] != exp_rows[0]["score"]

    # Scored orthogonalised (lopt.hub.orthogonalised_rule): the same decay, another rule.
    ortho = tmp_path / "ortho.json"
    args = ["--option", "weight_decay", "--values", "1e-2", "--orthogonalised", "--seeds", "1"]
    valid_sweep.main(["checkpoints/mnist1d-mlp-pes", *args, "--out", str(ortho)])
    (ortho_row,) = json.loads(ortho.read_text())
    assert ortho_row["score"] != rows[1]["score"] and 0 < ortho_row["score"] < 10

    # Another option held with --set while one is swept: the same decay of 1e-2, set there.
    held_set = tmp_path / "held_set.json"
    args = ["--option", "width_scale_max", "--values", "0", "--set", "weight_decay=1e-2"]
    valid_sweep.main(["checkpoints/mnist1d-mlp-pes", *args, "--seeds", "1", "--out", str(held_set)])
    (set_row,) = json.loads(held_set.read_text())
    assert set_row["score"] == rows[1]["score"]

    # The same tasks trained twice as long: twice the horizons, another score.
    longer = tmp_path / "longer.json"
    args = ["--option", "weight_decay", "--values", "0", "--seeds", "1", "--horizon-scale", "2"]
    valid_sweep.main(["checkpoints/mnist1d-mlp-pes", *args, "--out", str(longer)])
    (long_row,) = json.loads(longer.read_text())
    assert long_row["horizons"] == [2 * h for h in rows[0]["horizons"]]
    assert long_row["score"] != rows[0]["score"]

    # Fewer (or more) tasks of the same held-out stream: one here.
    one = tmp_path / "one.json"
    args = ["--option", "weight_decay", "--values", "0", "--seeds", "1", "--num-tasks", "1"]
    valid_sweep.main(["checkpoints/mnist1d-mlp-pes", *args, "--out", str(one)])
    (one_row,) = json.loads(one.read_text())
    assert len(one_row["horizons"]) == 1 and len(rows[0]["horizons"]) > 1
    assert "task0_ratio" in one_row and "task1_ratio" not in one_row


def test_an_unknown_option_or_folder_is_a_user_error(capsys):
    def error(argv: list[str]) -> str:
        assert valid_sweep.main(argv) == USAGE_ERROR
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "no option 'nope'" in error(
        ["checkpoints/mnist1d-mlp-pes", "--option", "nope", "--values", "1"]
    )
    assert "sweep one of them" in error(
        ["checkpoints/mnist1d-mlp-pes", "--option", "weight_decay_per_epoch", "--values", "1"]
        + ["--per-epoch-decay", "0.3"]
    )
    assert "needs --per-epoch-decay" in error(
        ["checkpoints/mnist1d-mlp-pes", "--option", "weight_decay_epoch_exponent"]
        + ["--values", "0.5"]
    )
    assert "needs --per-epoch-decay" in error(
        ["checkpoints/mnist1d-mlp-pes", "--option", "weight_decay_floor", "--values", "1e-3"]
    )
    one_decay = ["checkpoints/mnist1d-mlp-pes", "--option", "weight_decay", "--values", "1"]
    assert "--set wants OPTION=NUMBER, got 'weight_decay'" in error(
        [*one_decay, "--set", "weight_decay"]
    )
    assert "no option 'nope'" in error([*one_decay, "--set", "nope=1"])
    assert "each task's decay is set" in error(  # the decay per epoch would overwrite it
        ["checkpoints/mnist1d-mlp-pes", "--option", "width_scale_max", "--values", "1"]
        + ["--per-epoch-decay", "0.3", "--set", "weight_decay=1e-2"]
    )
    assert "--horizon-scale must be an integer >= 1" in error([*one_decay, "--horizon-scale", "0"])
    assert "--num-tasks must be an integer >= 1" in error([*one_decay, "--num-tasks", "0"])
    missing = ["no/such/dir", "--option", "weight_decay", "--values", "1"]
    assert error(missing) == "error: no checkpoint directory no/such/dir"
    # The same through `lopt measure`, which calls main directly: a message, no traceback.
    assert cli_main(["measure", "valid-sweep", *missing]) == USAGE_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: no checkpoint directory" in err
