"""The project's own measurement tools: throughput, cost and equal-budget comparisons.

Not part of using a learned optimizer or of benchmarking one (`evaluate.bench`): these
measure this project's meta-training and optimizers, and each runs as its own command.

- `evaluate.measure.speed`: meta-training throughput on the reference configuration, and
  side by side with google's learned_optimization (`--compare`).
  `python -m evaluate.measure.speed --outer-steps 40`
- `evaluate.measure.server_speed`: the gradient server's throughput, in-process against Ray
  with one and two workers at equal work. `python -m evaluate.measure.server_speed`
- `evaluate.measure.lopt_cost`: a learned optimizer's update time and state size per step,
  against Adam's. `python -m evaluate.measure.lopt_cost --kinds mlp,adafac`
- `evaluate.measure.compare`: meta-trains variants of one config at equal budget and
  evaluates them on held-out tasks; the engine of
  `python -m evaluate.measure.compare_estimators` (outer-gradient estimators) and
  `python -m evaluate.measure.compare_lopts` (learned-optimizer architectures).
- `evaluate.measure.plot_runs`: meta-loss, estimator variance and meta-validation score of
  runs from their metrics.jsonl. `python -m evaluate.measure.plot_runs runs/a runs/b --out x.png`
- `evaluate.measure.valid_sweep`: a trained θ's meta-validation score with one option of
  its optimizer swept, to choose a setting that is not meta-trained (a weight decay) on
  validation tasks rather than on a benchmark.
  `python -m evaluate.measure.valid_sweep checkpoints/generalist --option weight_decay
  --values 0 3e-3`

Each `main(argv=None, prog=None)` takes its arguments as a list, so a dispatcher can call it.
"""
