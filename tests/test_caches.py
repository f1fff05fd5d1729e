"""`tasks.caches`: one root for every cache, moved by `LOPT_CACHE_DIR`."""

from pathlib import Path

from evaluate.bench.baselines import default_cache_dir
from tasks import datasets
from tasks.caches import cache_dir


def test_every_cache_lives_under_one_root_that_the_environment_moves(monkeypatch, tmp_path):
    monkeypatch.delenv("LOPT_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir("bench") == tmp_path / "home" / ".cache" / "lopt" / "bench"
    monkeypatch.setenv("LOPT_CACHE_DIR", "~/elsewhere")
    root = tmp_path / "home" / "elsewhere"
    assert cache_dir("x") == root / "x" and not (root / "x").exists()  # not created
    assert default_cache_dir() == root / "bench"
    assert datasets._cache_root(None) == root / "datasets"
    assert datasets._cache_root("~/mine") == Path.home() / "mine"  # an explicit folder wins
    # meta_train.jit's compile cache: tests/test_jit.py
