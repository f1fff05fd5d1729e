"""Task groups over mixed shapes: the template schedule, the per-group outer step (the same
numbers as the fused one), and a mixed-family run that visits every kind, stays within the
compile bound and resumes exactly."""

import json

import jax
import numpy as np
import pytest
from mixed_data import mixed_family

from meta_train.build import build_run
from meta_train.config import load_config
from meta_train.groups import TemplateSchedule
from meta_train.learner import grouped_outer_step, outer_step
from meta_train.main import meta_train


def test_schedule_visits_every_template_and_switches_one_group_at_a_time():
    s = TemplateSchedule(num_templates=7, groups=3, switch_every=4, seed=0)
    assert s.templates_at(0) == tuple(s.item(i) for i in range(3))
    # Each cycle of the sequence is a permutation of all templates.
    assert sorted(s.item(i) for i in range(7)) == list(range(7))
    assert sorted(s.item(i) for i in range(7, 14)) == list(range(7))
    prev = s.templates_at(0)
    for step in range(1, 60):
        now = s.templates_at(step)
        g = s.switching_group(step)
        changed = [i for i in range(3) if now[i] != prev[i]]
        if g is None:
            assert now == prev, step
        else:
            assert step % 4 == 0 and g == (step // 4 - 1) % 3
            assert set(changed) <= {g}  # only the switching group (it may redraw its own)
        prev = now
    # Every template is in play within (T - G) * N outer steps.
    assert s.visited((7 - 3) * 4 + 1) == set(range(7))
    assert s.visited(1) == set(s.templates_at(0))
    # A checkpoint after `done` steps holds the templates of the last step run.
    assert s.held_at(8) == s.templates_at(7) and s.held_at(0) == s.templates_at(0)
    # Without switching, groups keep their first templates.
    fixed = TemplateSchedule(7, 3, 0, 0)
    assert fixed.templates_at(1000) == fixed.templates_at(0) and fixed.switching_group(9) is None


MIXED = [
    "task_family.kinds=['mlp', 'conv', 'lm']",
    "task_family.datasets=['mnist1d']",
    "task_family.hidden_sizes=[[8]]",
    "task_family.batch_sizes=[8]",
    "task_family.conv_datasets=['fashion_mnist']",
    "task_family.conv_channels=[[4, 4]]",
    "task_family.conv_strides=[[2, 2]]",
    "task_family.conv_batch_sizes=[8]",
    "task_family.lm_models=['rnn', 'transformer']",
    "task_family.lm_hidden=[8]",
    "task_family.lm_seq_lens=[8]",
    "task_family.lm_batch_sizes=[4]",
    "task_family.activations=['relu', 'tanh']",
    "task_family.reparam_scale=[0.5, 2.0]",
    "task_family.loss_scale=[0.5, 2.0]",
    "task_family.label_noise=0.1",
    "meta.num_pairs=4",
    "meta.task_groups=2",
    "meta.switch_every=1",
    "meta.window=5",
    "meta.min_episode_len=10",
    "meta.max_episode_len=20",
    "meta.objective='valid_final'",
    "run.wandb_mode=disabled",
    "run.log_every=1",
    "run.checkpoint_every=2",
    "valid.every=0",  # meta-validation has its own tests (test_validation.py)
]


def _mixed_run(out_dir, *extra):
    config = load_config(None, [*MIXED, f"run.out_dir='{out_dir}'", *extra])
    return build_run(config, mixed_family(config))


@pytest.mark.slow  # ~40 s; CI runs it after the default suite
def test_mixed_run_visits_every_kind_within_the_compile_bound_and_resumes_exactly(tmp_path):
    from meta_train.build import _init_group  # noqa: PLC0415
    from meta_train.learner import apply_gradient, estimate_group  # noqa: PLC0415

    before = {f: f._cache_size() for f in (estimate_group, _init_group, apply_gradient)}
    run = _mixed_run(tmp_path / "a", "meta.outer_steps=6")
    assert [t.kind for t in run.family.templates] == ["mlp", "conv", "lm", "lm"]
    state, metrics = meta_train(run)
    T = run.family.num_templates
    # Four templates, two groups, a switch every step: all four in play by step 3.
    assert run.schedule.visited(6) == set(range(T))
    assert {run.family.templates[t].kind for t in run.schedule.visited(6)} == {"mlp", "conv", "lm"}
    # Compilation is bounded by the templates: one group step and one group start per
    # template, one outer update for every mix (this test's runs add nothing new later).
    grew = {f.__name__: f._cache_size() - n for f, n in before.items()}
    assert grew["estimate_group"] <= T and grew["_init_group"] <= T
    assert grew["apply_gradient"] <= 1
    assert metrics["templates_visited"] == T and np.isfinite(metrics["meta_loss"])
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.theta))

    # Interrupted after 2 steps (mid-schedule) and resumed: the same θ, bit for bit.
    first = _mixed_run(tmp_path / "b", "meta.outer_steps=2")
    meta_train(first)
    resumed, _ = meta_train(_mixed_run(tmp_path / "b", "meta.outer_steps=6"), resume=True)
    for a, b in zip(jax.tree.leaves(state.theta), jax.tree.leaves(resumed.theta), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # ~28 s: compiles the fused and the grouped step
def test_grouped_step_gives_the_numbers_of_the_fused_step(tmp_path):
    # Fixed templates: one jitted call per group, then the update, equals one jitted call.
    run = _mixed_run(tmp_path, "meta.switch_every=0", "meta.task_groups=2")
    estimators = [run.group_estimator(t) for t in run.templates]
    a, b = run.init_state(), run.init_state()
    a, ma = outer_step(run.estimator, a, run.outer_opt)
    b, mb = grouped_outer_step(estimators, b, run.outer_opt)
    # Separate compilations may order float32 sums differently, and ES divides loss
    # differences of ~1e-3 by 2σ²: agreement to 1e-3 of the gradient's largest entry
    # (exact agreement is not promised across programs).
    g_a, g_b = np.asarray(a.last_grad), np.asarray(b.last_grad)
    np.testing.assert_allclose(g_a, g_b, rtol=0, atol=1e-3 * np.abs(g_a).max())
    assert float(ma["meta_loss"]) == pytest.approx(float(mb["meta_loss"]), rel=1e-5)
    # The rest of the state (particles, PES accumulators) is the same to float32 rounding.
    for x, y in zip(jax.tree.leaves(a.est_state), jax.tree.leaves(b.est_state), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_kind_weights_set_the_kinds_frequencies_after_every_template_was_visited(tmp_path):
    run = _mixed_run(tmp_path, "task_family.kind_weights=[1.0, 1.0, 6.0]")
    probs = run.family.template_probs()
    # mlp, conv, lm (two templates): kind probabilities 1/8, 1/8, 6/8 split within a kind.
    np.testing.assert_allclose(probs, [1 / 8, 1 / 8, 3 / 8, 3 / 8], rtol=1e-12)
    s = run.schedule
    assert s.probs == probs
    assert sorted(s.item(i) for i in range(4)) == [0, 1, 2, 3]  # the first cycle: all
    later = np.bincount([s.item(i) for i in range(4, 4004)], minlength=4) / 4000
    np.testing.assert_allclose(later, probs, atol=0.03)  # 4,000 draws: ±0.03 is > 4 sd
    kinds = [
        run.family.templates[run.family.sample_template(jax.random.PRNGKey(i))].kind
        for i in range(400)
    ]
    assert 0.65 < kinds.count("lm") / 400 < 0.85
    with pytest.raises(Exception, match="kind_weights needs one weight > 0 per kind"):
        _mixed_run(tmp_path, "task_family.kind_weights=[1.0, 2.0]")


def _fashion_mnist_missing() -> bool:
    from tasks.datasets import DatasetNotFoundError, load_dataset  # noqa: PLC0415

    try:
        load_dataset("fashion_mnist", resolution=14)
    except DatasetNotFoundError:
        return True
    return False


@pytest.mark.slow  # ~45 s: `.ci/run` runs it after the default suite
@pytest.mark.skipif(_fashion_mnist_missing(), reason="Fashion-MNIST is not installed")
def test_readme_mixed_command_runs_and_evaluates_every_kind(tmp_path, capsys):
    import shlex  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from meta_train.main import main  # noqa: PLC0415

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    (line,) = [
        ln
        for ln in readme.splitlines()
        if ln.startswith("python -m meta_train.main --config configs/mixed.toml")
    ]
    args = shlex.split(line.split("#")[0])[3:]
    # The README's command, shortened: 2 outer steps (the config's 3 groups: 3 templates
    # compile), a short evaluation of 2 held-out tasks.
    small = [
        f"run.out_dir='{tmp_path}'",
        "run.wandb_mode=disabled",
        "meta.outer_steps=2",
        "eval.num_tasks=2",
        "eval.num_seeds=1",
        "eval.num_steps=10",
        "eval.adam_lrs=[1e-3]",
    ]
    assert main([*args, *small]) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    kinds = {t["info"]["kind"] for t in results["tasks"]}
    assert kinds and set(results["summary_by_kind"]) == kinds
    if len(kinds) > 1:
        assert "### kind:" in out


@pytest.mark.slow  # ~50 s: one compile per template of the mixed family; CI runs it
def test_meta_losses_are_normalised_by_the_uniform_predictors_loss(tmp_path):
    run = _mixed_run(tmp_path)
    theta = run.lopt.init_meta(jax.random.PRNGKey(0))
    for t, template in enumerate(run.family.templates):
        problem = run.problem(t)
        inner = problem.reset(theta, jax.random.PRNGKey(t), jax.numpy.int32(20))
        key = jax.random.PRNGKey(100 + t)
        _, meta, finite = problem.step(theta, inner, key)
        # The same step by hand: the augmented task's loss, unscaled, over ln(classes).
        task = template.sampler.task(template.task, inner.draw)
        batch = task.sample_batch(key)
        loss = template.sampler.unscaled(inner.draw, task.loss(inner.params, batch))
        want = float(loss) / np.log(task.num_classes)
        assert bool(finite)
        # float32 division of the same float32 loss: within 1e-6 (then the clip at 1.5).
        np.testing.assert_allclose(meta, min(want, problem.loss_clip), rtol=1e-6)
        if template.kind == "lm":
            # A fresh LM predicts bytes about uniformly: it starts near 1, under the clip.
            # (The generated classification data here are not standardised, so their
            # fresh losses depend on the sampled init scale and reparameterisation.)
            assert 0.8 < float(meta) < 1.2, float(meta)
