"""Benchmark suites: named suites, suite files, held-out family tasks, missing data."""

import jax
import pytest

from evaluate.bench.suites import (
    SuiteError,
    build_task,
    classic_tasks,
    family_tasks,
    get_suite,
    load_suite_file,
    missing_data,
)
from meta_train.build import HELD_OUT_STREAM
from meta_train.config import load_config
from tasks.family import TaskFamily


def test_classic_names_known_tasks_some_at_two_horizons():
    tasks = classic_tasks()
    names = [t.name for t in tasks]
    assert len(set(names)) == len(names)
    bases = [n.split("@")[0] for n in names]
    for known in (
        "mlp-mnist",
        "mlp-fashion_mnist",
        "mlp-mnist1d",
        "conv-fashion_mnist",
        "conv-cifar10",
        "lstm-pydoc",
        "transformer-pydoc",
    ):
        assert known in bases
    assert {t.steps for t in tasks if t.name.startswith("mlp-fashion_mnist")} == {1000, 5000}
    assert all(t.description for t in tasks)


def test_unknown_suite_and_in_family_without_a_config_fail_clearly():
    with pytest.raises(SuiteError, match="unknown suite 'clasic'; known: quick, classic"):
        get_suite("clasic")
    with pytest.raises(SuiteError, match="needs a family: pass --config"):
        get_suite("in_family")


def test_overrides_set_every_horizon_and_the_seeds():
    s = get_suite("classic").with_overrides(steps=50, seeds=4)
    assert s.seeds == 4 and {t.steps for t in s.tasks} == {50}
    assert all(t.name.endswith("@50") for t in s.tasks)
    # The two horizons of one task become one task.
    assert len(s.tasks) == len({t.name for t in s.tasks}) < len(classic_tasks())


def test_in_family_tasks_are_the_held_out_tasks_of_python_m_evaluate():
    config = load_config("configs/default.toml")
    tasks = family_tasks(config)
    assert len(tasks) == config.eval.num_tasks
    assert {t.steps for t in tasks} == {config.meta.max_episode_len}
    family = TaskFamily(config.task_family)
    key = jax.random.fold_in(jax.random.PRNGKey(config.run.seed), HELD_OUT_STREAM)
    keys = jax.random.split(key, config.eval.num_tasks)  # as evaluate.suite.run_suite
    for t, k in zip(tasks, keys, strict=True):
        built, info = build_task(t)
        expected, expected_info = family.sample_with_info(k)
        assert info == expected_info
        assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), built.hp, expected.hp))


def test_suite_files_define_suites_and_bad_ones_say_what_is_wrong(tmp_path):
    good = tmp_path / "mine.toml"
    good.write_text(
        'seeds = 2\nbaselines = "quick"\n[[task]]\nname = "m@30"\nkind = "mlp"\nsteps = 30\n'
        'dataset = "mnist1d"\nhidden_sizes = [8]\n'
    )
    s = get_suite(str(good))
    assert (s.name, s.seeds, [t.name for t in s.tasks]) == ("mine", 2, ["m@30"])
    built, info = build_task(s.tasks[0])
    assert info["hidden_sizes"] == [8] and built.batch_size == 128
    cases = {
        "x = 1\n": "unknown keys",
        "[[task]]\nname = 'a'\nkind = 'mlp'\n": "lacks",
        "[[task]]\nname='a'\nkind='mlp'\nsteps=5\nwidth=3\n": "unknown options \\['width'\\]",
        "[[task]]\nname='a'\nkind='rnn'\nsteps=5\n": "unknown kind 'rnn'",
        "[[task]]\nname='a'\nkind='mlp'\nsteps=5\n" * 2: "duplicate",
        "seeds = [": "suite file",
        "": "no \\[\\[task\\]\\] entries",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.toml"
        bad.write_text(text)
        with pytest.raises(SuiteError, match=message):
            load_suite_file(bad)


def test_missing_data_gives_the_loaders_message(tmp_path, monkeypatch):
    import tasks.datasets  # noqa: PLC0415

    monkeypatch.setattr(tasks.datasets, "DEBIAN_ROOT", str(tmp_path / "debian"))
    monkeypatch.setenv("LOPT_NO_TFDS", "1")
    monkeypatch.delenv("LOPT_DATA_DIR", raising=False)
    cifar = next(t for t in classic_tasks() if t.name.startswith("conv-cifar10"))
    reason = missing_data(cifar, str(tmp_path))
    assert "cifar10" in reason and "cifar-10-batches-py" in reason
    mnist1d = next(t for t in classic_tasks() if t.name.startswith("mlp-mnist1d"))
    assert missing_data(mnist1d) is None
    lstm = next(t for t in classic_tasks() if t.name.startswith("lstm"))
    assert missing_data(lstm) is None  # pydoc ships with Python
