"""Run configurations: typed, strict, overridable, saved with each run."""

import dataclasses
import json
from pathlib import Path

import pytest

from meta_train.config import Config, ConfigError, from_dict, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_overrides_parse_toml_values_and_bare_strings():
    c = load_config(
        None,
        [
            "meta.outer_steps=7",
            "task_family.hidden_sizes=[[8], [4, 4]]",
            "run.name=my-run",
            "meta.sigma=0.1",
            "task_family.grayscale=false",
        ],
    )
    assert c.meta.outer_steps == 7
    assert c.task_family.hidden_sizes == ((8,), (4, 4))
    assert c.run.name == "my-run"
    assert c.meta.sigma == 0.1 and c.task_family.grayscale is False


@pytest.mark.parametrize(
    "override, message",
    [
        ("meta.outer_stpes=3", "meta.outer_stpes"),
        ("metaa.window=3", "metaa"),
        ("meta.window='20'", "meta.window"),
        ("meta.sigma=true", "meta.sigma"),
        ("task_family.hidden_sizes=[['a']]", r"task_family.hidden_sizes\[0\]\[0\]"),
        ("meta.window=500", "min_episode_len"),
        ("run.wandb_mode=cloud", "run.wandb_mode"),
        ("task_family.activations=['sine']", "sine"),
        ("nonsense", "section.key=value"),
    ],
)
def test_bad_keys_and_types_fail_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_file_is_named(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[meta]\nwindow = 10\nwindoww = 3\n")
    with pytest.raises(ConfigError, match="meta.windoww"):
        load_config(p)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_resolved_config_round_trips_through_json(tmp_path):
    c = load_config(ROOT / "configs" / "default.toml", ["meta.outer_steps=3"])
    save_config(c, tmp_path / "config.json")
    assert from_dict(json.loads((tmp_path / "config.json").read_text())) == c


# ------------------------------------------------------------------------ value ranges


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        # Nonsense that was accepted and ran (issue 7, point 3).
        ("meta.outer_lr=nan", "meta.outer_lr", "finite number > 0"),
        ("meta.outer_lr=0", "meta.outer_lr", "finite number > 0"),
        ("meta.outer_lr=-1", "meta.outer_lr", "finite number > 0"),
        ("meta.outer_lr=inf", "meta.outer_lr", "finite number > 0"),
        ("meta.grad_clip=0", "meta.grad_clip", "finite number > 0"),
        ("meta.grad_clip=-1.0", "meta.grad_clip", "finite number > 0"),
        ("meta.loss_clip=0", "meta.loss_clip", "finite number > 0"),
        ("meta.diff_clip=-0.5", "meta.diff_clip", r">= 0 \(0: off\)"),
        ("meta.diff_clip=nan", "meta.diff_clip", r">= 0 \(0: off\)"),
        ("meta.sigma=nan", "meta.sigma", "finite number > 0"),
        ("eval.adam_lrs=[1e-3, -1e-2]", r"eval.adam_lrs\[1\]", "finite number > 0"),
        ("eval.adam_lrs=[nan]", r"eval.adam_lrs\[0\]", "finite number > 0"),
        ("lopt.hidden_layers=-1", "lopt.hidden_layers", "integer >= 0"),
        ("lopt.hidden_layers=0", r"\[lopt\] MLPLOpt: hidden_layers", ">= 1"),
        ("lopt.rms_decay=1.0", "lopt.rms_decay", r"in \[0, 1\)"),
        ("lopt.momentum_decays=[0.9, -0.1]", r"lopt.momentum_decays\[1\]", r"in \[0, 1\)"),
        ("lopt.step_mult=0", "lopt.step_mult", "finite number > 0"),
        ("lopt.exp_mult=-1e-3", "lopt.exp_mult", "finite number > 0"),
        ('lopt.step_schedule="linear"', "lopt.step_schedule", "one of 'constant', 'cosine'"),
        ("lopt.step_schedule_final=1.5", "lopt.step_schedule_final", r"in \[0, 1\]"),
        ("task_family.init_scale=[2.0, 1.0]", "task_family.init_scale", "low <= high"),
        ("task_family.init_scale=[0.0, 1.0]", "task_family.init_scale", "0 < low"),
        ("task_family.init_scale=[1.0, inf]", "task_family.init_scale", "finite"),
        ("task_family.valid_size=1.0", "task_family.valid_size", r"in \(0, 1\)"),
        ("task_family.resolution=-8", "task_family.resolution", "integer >= 0"),
        ("run.seed=-1", "run.seed", r"\[0, 2\*\*32 - 1\]"),
        ("run.seed=4294967296", "run.seed", "wrap around"),
        ("run.out_dir=''", "run.out_dir", "non-empty string"),
        ("run.max_to_keep=0", "run.max_to_keep", "integer >= 1"),
        ("meta.min_episode_len=0", "meta.min_episode_len", "integer >= 1"),
        # Errors that used to surface only after compilation or meta-training (point 4).
        ("run.checkpoint_every=0", "run.checkpoint_every", "integer >= 1"),
        ("run.log_every=0", "run.log_every", "integer >= 1"),
        ("eval.num_tasks=0", "eval.num_tasks", "integer >= 1"),
        ("eval.num_seeds=0", "eval.num_seeds", "integer >= 1"),
        ("eval.num_steps=-1", "eval.num_steps", "integer >= 0"),
        ("eval.eval_every=-1", "eval.eval_every", "integer >= 0"),
        ("eval.adam_lrs=[]", "eval.adam_lrs", "non-empty list, each item a finite number > 0"),
        ("lopt.momentum_decays=[]", "lopt.momentum_decays", r"non-empty list, each item .*\[0"),
        # Values that used to end in a traceback (point 7).
        ("lopt.kind=adam", "lopt.kind", "one of .*'mlp'"),
        ("task_family.datasets=['mnist1d', 'svhn']", r"task_family.datasets\[1\]", "'mnist1d'"),
        ("task_family.datasets=[]", "task_family.datasets", "non-empty list"),
        ("task_family.activations=[]", "task_family.activations", "non-empty list.*'relu'"),
        ("task_family.batch_sizes=[0]", r"task_family.batch_sizes\[0\]", "integer >= 1"),
        ("task_family.hidden_sizes=[[32], [0]]", r"task_family.hidden_sizes\[1\]\[0\]", ">= 1"),
        ("task_family.hidden_sizes=[]", "task_family.hidden_sizes", "non-empty list"),
        ("lopt.hidden_size=0", "lopt.hidden_size", "integer >= 1"),
    ],
)
def test_values_out_of_range_fail_naming_the_key_and_what_is_allowed(override, key, allowed):
    with pytest.raises(ConfigError, match=f"^{key} must be .*{allowed}") as info:
        load_config(None, [override])
    assert "got" in str(info.value)  # and the value it got


@pytest.mark.parametrize(
    "overrides, keys",
    [
        (["meta.num_pairs=6", "meta.task_groups=4"], ["meta.num_pairs", "meta.task_groups"]),
        (["meta.window=50", "meta.min_episode_len=40"], ["meta.window", "meta.min_episode_len"]),
        (["meta.min_episode_len=500"], ["meta.min_episode_len", "meta.max_episode_len"]),
        (["meta.estimator=full_es"], ["meta.window", "meta.max_episode_len"]),
    ],
)
def test_relations_between_keys_name_every_key_involved(overrides, keys):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    for key in keys:
        assert key in str(info.value)


def test_documented_special_values_are_accepted():
    c = load_config(
        None,
        [
            "meta.diff_clip=0",  # off
            "eval.num_steps=0",  # meta.max_episode_len
            "eval.eval_every=0",  # start and end only
            "task_family.resolution=0",  # keep the size
            "task_family.hidden_sizes=[[], [8]]",  # [] is a linear classifier
            "lopt.momentum_decays=[0.0, 0.9]",
            "run.seed=4294967295",
            "meta.outer_lr=1",  # an integer where a float is expected
        ],
    )
    assert c.meta.diff_clip == 0.0 and c.eval.eval_every == 0
    assert c.task_family.hidden_sizes == ((), (8,))
    assert c.meta.outer_lr == 1.0 and isinstance(c.meta.outer_lr, float)


def test_every_key_of_every_section_has_exactly_one_rule():
    from meta_train.config import RULES  # noqa: PLC0415

    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    assert set(RULES) == set(sections)
    defaults = Config()
    for name in sections:
        if name == "lopt":  # the kind's options: shared rules name options of some kind
            continue
        fields = {f.name for f in dataclasses.fields(getattr(defaults, name))}
        assert set(RULES[name]) == fields, name
    from lopt.registry import LOPTS  # noqa: PLC0415

    options = {f.name for cls in LOPTS.values() for f in dataclasses.fields(cls)}
    assert set(RULES["lopt"]) - {"kind"} <= options


def test_sections_built_directly_are_checked_too():
    from meta_train.config import EvalConfig, LOptConfig, MetaConfig, RunConfig  # noqa: PLC0415

    with pytest.raises(ConfigError, match="meta.sigma"):
        MetaConfig(sigma=float("nan"))
    with pytest.raises(ConfigError, match="eval.adam_lrs"):
        EvalConfig(adam_lrs=())
    with pytest.raises(ConfigError, match="MLPLOpt: hidden_layers must be >= 1"):
        LOptConfig(hidden_layers=0)
    with pytest.raises(ConfigError, match="run.log_every"):
        RunConfig(log_every=0)
    family = dataclasses.replace(Config().task_family, batch_sizes=(0,))  # tasks.family's class
    with pytest.raises(ConfigError, match=r"task_family.batch_sizes\[0\]"):
        Config(task_family=family)


def test_config_file_that_is_a_directory_or_not_utf8_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[run]\nname = "café"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin1} is not UTF-8"):
        load_config(latin1)
    utf8 = tmp_path / "utf8.toml"
    utf8.write_bytes('[run]\nname = "café"\n'.encode())
    assert load_config(utf8).run.name == "café"


def test_lopt_section_is_a_kind_and_its_resolved_options():
    from lopt.mlp_lopt import MLPLOpt  # noqa: PLC0415

    c = load_config(None, ["lopt.hidden_size=8"])
    saved = c.to_dict()["lopt"]
    # Every option of the kind is saved, left-out ones at the class's defaults.
    assert set(saved) == {"kind"} | {f.name for f in dataclasses.fields(MLPLOpt)}
    assert saved["hidden_size"] == 8 and saved["hidden_layers"] == MLPLOpt().hidden_layers
    assert c.lopt.hidden_size == 8 and from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError, match=r"lopt.nope for lopt kind 'mlp'; its keys"):
        load_config(None, ["lopt.nope=1"])
    with pytest.raises(AttributeError, match="no option 'nope'"):
        _ = c.lopt.nope


def test_overriding_the_kind_starts_its_options_afresh():
    from lopt.hyper import LearnedAdamLOpt  # noqa: PLC0415

    default = ROOT / "configs" / "default.toml"
    c = load_config(default, ["lopt.kind='learned_adam'", "lopt.step_schedule='cosine'"])
    # default.toml's hidden_size = 32 was the MLP's; learned Adam keeps its own default.
    assert c.lopt.kind == "learned_adam"
    assert c.lopt.hidden_size == LearnedAdamLOpt().hidden_size != 32
    assert c.lopt.step_schedule == "cosine"
    # Options given before the kind are kept (and checked against it).
    c = load_config(default, ["lopt.base_lr=0.01", "lopt.kind='learned_adam'"])
    assert c.lopt.base_lr == 0.01
    with pytest.raises(ConfigError, match="lopt.base_lr for lopt kind 'mlp'"):
        load_config(default, ["lopt.base_lr=0.01"])
    # The same kind keeps the file's options.
    assert load_config(default, ["lopt.kind='mlp'"]).lopt.step_schedule == "cosine"
