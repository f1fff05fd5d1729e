"""The optimizer benchmark: any optimizer against per-task tuned baselines on a named suite.

    python -m evaluate.bench --optimizer mnist1d-mlp-pes --suite quick

Modules, in the order a benchmark uses them:

- `evaluate.bench.cli`: the command line (`python -m evaluate.bench`, `main(argv)`): parses
  the arguments, builds the jobs, runs them and writes the report.
- `evaluate.bench.specs`: `--optimizer` SPEC strings (a checkpoint directory, a shipped
  optimizer, `optax:NAME(ARGS)`, `module:function`) and the optax transformations they build.
- `evaluate.bench.suites`: the task suites (`quick`, `classic`, `in_family`, suite files)
  as plain, hashable `BenchTask` descriptions, and building them into tasks.
- `evaluate.bench.baselines`: the tuned baselines (Adam, Adam with warm-up and cosine
  decay, SGD with momentum), their learning-rate grids and their on-disk cache.
- `evaluate.bench.runner`: one job (an optimizer, or a baseline's whole grid, on one task
  for every seed) and the worker processes that run them.
- `evaluate.bench.speedup`: the speed-up over tuned Adam and its summaries across tasks.
- `evaluate.bench.results`: assembles finished jobs into the results dict (results.json).
- `evaluate.bench.report`: Markdown tables, figures and the wandb run of a results dict.

Importing the package imports none of them (and nothing heavy); import the module you need.
"""
