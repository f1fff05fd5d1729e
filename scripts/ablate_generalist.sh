#!/usr/bin/env bash
# Equal-budget ablations of configs/generalist.toml (issue 23): each runs the recipe's first
# STOP outer steps (meta.stop_after: the schedules still span the recipe's 6,000) with one
# switch changed, with meta-validation on the recipe's 6 held-out tasks every 250 steps.
# The shipped optimizer is the recipe's own best checkpoint at step 1,500, so STOP=1500 is
# its budget exactly.
#
#   bash scripts/ablate_generalist.sh NAME [STOP]     # NAME: a key of ABLATIONS below
set -euo pipefail
# `hierarchical` names the three momenta it ran with (the kind's default is two since).
declare -A ABLATIONS=(
  [no_fan_in]="lopt.width_scaling='none'"
  [rms_output]="lopt.output_norm='rms'"
  [hierarchical]="lopt.kind='hierarchical' lopt.step_schedule='cosine' lopt.momentum_decays=[0.5,0.9,0.99]"
  [pes]="meta.estimator='pes'"
  [no_augment]="task_family.reparam_scale=[] task_family.loss_scale=[] task_family.label_noise=0.0"
  [mlp_only]="task_family.kinds=['mlp']"
  [short_horizons]="meta.min_episode_len=100 meta.max_episode_len=500"
  [long_horizons]="meta.min_episode_len=400 meta.max_episode_len=2000"
)
name=$1
stop=${2:-1500}
[[ -v ABLATIONS[$name] ]] || { echo "unknown ablation $name; known: ${!ABLATIONS[*]}" >&2; exit 2; }
# shellcheck disable=SC2086  # the overrides are separate words
exec "${PYTHON:-.venv/bin/python}" -m meta_train.main --config configs/generalist.toml --no-eval \
  "meta.stop_after=$stop" "run.out_dir='runs/ablations/$name'" "run.name='ablate-$name'" \
  ${ABLATIONS[$name]}
