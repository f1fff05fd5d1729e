#!/usr/bin/env bash
# The GPU tables of docs/speed.md, in one run (issue 22): the cost of one learned update
# against optax.adam at 1M and 10M parameters, fused and matmul paths, and the
# meta-training throughput of the reference configuration.
#
#   OUT=DIR bash scripts/gpu_tables.sh [PYTHON]
#
# PYTHON (default python3) must import jax with a GPU backend, flax, optax and orbax; the
# project itself needs no install (it runs from the repository root). Each measurement has
# its own time limit, so one failure leaves the others' results in $OUT.
set -u
PY=${1:-python3}
OUT=${OUT:?set OUT to a directory for the results}
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" || exit 1

MLP_4X2=(
  --lopt mlp-4x2=mlp:hidden_size=4,hidden_layers=2
  --lopt mlp-4x2-matmul=mlp:hidden_size=4,hidden_layers=2,impl=matmul
)
HIERARCHICAL_MATMUL=(--lopt hierarchical-matmul=hierarchical:impl=matmul)
VARIANTS=(
  "${MLP_4X2[@]}"
  --lopt mlp-8x2=mlp:hidden_size=8,hidden_layers=2
  --lopt mlp-16x2=mlp:hidden_size=16,hidden_layers=2
  --lopt mlp-16x2-matmul=mlp:hidden_size=16,hidden_layers=2,impl=matmul
  --lopt adafac-matmul=adafac:impl=matmul
  "${HIERARCHICAL_MATMUL[@]}"
)
# AdaFac's fused update compiles for about 110 s on an H100 (jax 0.11.2), the others in
# 1-12 s; at 10M parameters it is left out so that the whole script fits in 10 minutes.
echo "== lopt_cost --model 1m"
timeout 280 "$PY" -m evaluate.measure.lopt_cost --model 1m \
  --kinds mlp,adafac,hierarchical "${VARIANTS[@]}" --rounds 5 --calls 50 \
  --json "$OUT/lopt_cost_1m.json" 2>&1 | tee "$OUT/lopt_cost_1m.txt"
echo "== lopt_cost --model 10m"
timeout 150 "$PY" -m evaluate.measure.lopt_cost --model 10m --kinds mlp,hierarchical \
  "${MLP_4X2[@]}" "${HIERARCHICAL_MATMUL[@]}" --rounds 5 --calls 20 \
  --json "$OUT/lopt_cost_10m.json" 2>&1 | tee "$OUT/lopt_cost_10m.txt"
echo "== speed (reference configuration, 8x8 images)"
timeout 120 "$PY" -m evaluate.measure.speed --outer-steps 40 \
  --json "$OUT/speed.json" 2>&1 | tee "$OUT/speed.txt"
