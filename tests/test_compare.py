"""Equal-budget comparisons: variant specs and the zoo's default variants."""

from pathlib import Path

import pytest

from evaluate.measure.compare import parse_variants
from evaluate.measure.compare_lopts import default_variants
from lopt.registry import LOPTS
from meta_train.config import load_config

DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.toml"


def test_variants_parse_in_order_and_bad_specs_fail():
    got = parse_variants(["a=meta.sigma=0.1; lopt.hidden_size=8", "b="])
    assert got == {"a": ["meta.sigma=0.1", "lopt.hidden_size=8"], "b": []}
    assert list(got) == ["a", "b"]
    with pytest.raises(ValueError, match="NAME="):
        parse_variants(["meta.sigma"])
    with pytest.raises(ValueError, match="twice"):
        parse_variants(["a=", "a="])


def test_every_default_variant_is_a_valid_config_and_every_kind_is_compared():
    variants = parse_variants(default_variants())
    kinds = set()
    for name, overrides in variants.items():
        config = load_config(DEFAULT, overrides)
        kinds.add(config.lopt.kind)
        # The default config's cosine step schedule, whatever the kind.
        assert config.lopt.step_schedule == "cosine", name
    assert kinds == set(LOPTS)
