"""Run configurations: typed, strict, overridable, saved with each run."""

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
