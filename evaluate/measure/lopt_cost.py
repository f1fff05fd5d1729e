"""What a learned optimizer costs per step, against Adam, in the same process.

    python -m evaluate.measure.lopt_cost [--kinds mlp,adafac,...] [--lopt NAME=KIND:KEY=VALUE,...]
                                 [--rounds 5] [--calls 20] [--compiler lopt|xla|both]
                                 [--json F]

For every learned optimizer of `lopt.registry.LOPTS` (default options, a fresh θ), every
`--lopt` variant (e.g. `--lopt mlp-small=mlp:hidden_size=8,hidden_layers=1`) and
`optax.adam`, on the parameters of a ConvNet (`--model`: 1m, three 3×3 convolutions and two
dense layers on 32×32×3 inputs, 967,130 parameters; or 10m, wider, with three dense layers,
10,193,034 parameters), reports:

- the wall time of one jitted `update` (gradients, state and params in, updates and state
  out; buffers donated, as in a training loop) relative to Adam's: rounds alternate between
  the optimizers so that drift hits all alike, and the median of the per-round ratios is
  printed with its range. Every update is jitted as `lopt.compiler_options()` advises a
  training loop to be (on the CPU: sums may be reassociated, so XLA vectorises them);
  `--compiler xla` measures under XLA's own options instead, `--compiler both` under each
  in the same rounds;
- the optimizer state size in bytes per parameter (Adam: 8, two float32 moments);
- a floor, `mlp state only`: an update that only advances the per-parameter MLP's
  accumulators (4 momenta and a mean square, 20 bytes per parameter) and steps along one
  momentum, no features, no network. No per-parameter optimizer with that state can be
  cheaper; on a CPU whose last-level cache holds Adam's working set but not this one, it
  alone is a large part of a 3× budget.

Targets (issue 11, this project's 2-core CPU): per-parameter MLP and AdaFac ≤ 3× Adam's
update time, hierarchical ≤ 4×. The output says which hold. Absolute times drift by up to 2×
on shared machines from hour to hour; ratios measured in the same run are what to compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lopt.common import EPS, moment_features
from lopt.mlp_lopt import MLPLOpt

# Update-time targets relative to Adam (issue 11); kinds not listed have none.
TARGETS = {"mlp": 3.0, "adafac": 3.0, "hierarchical": 4.0}


class CostNet(nn.Module):
    """The benchmark's models: three 3×3 convolutions with 2×2 max-pooling on 32×32×3
    inputs, then dense layers; conv kernels, dense kernels and biases.

    Attributes:
      channels: the convolutions' output channels.
      dense: the hidden dense layers' widths (a 10-way output layer follows).
    """

    channels: tuple[int, ...] = (32, 64, 64)
    dense: tuple[int, ...] = (880,)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for features in self.channels:
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)  # 4×4×channels
        for width in self.dense:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


MODELS = {  # name: the model (its parameter count in the name)
    "1m": CostNet(),  # 967,130 parameters
    "10m": CostNet(channels=(64, 128, 128), dense=(4096, 384)),  # 10,193,034 parameters
}


def cost_params(key: jax.Array, model: str = "1m") -> Any:
    """The parameters (float32) of `MODELS[model]`."""
    return MODELS[model].init(key, jnp.zeros((1, 32, 32, 3)))["params"]


def num_params(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def state_bytes(state: Any) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


FLOOR = "mlp state only"
XLA_DEFAULTS_SUFFIX = "[XLA defaults]"
COMPILER_CHOICES = ("lopt", "xla", "both")
_COMPILER_LABELS = {
    "lopt": "lopt.compiler_options()",
    "xla": "XLA's default options",
    "both": "lopt.compiler_options() and XLA's defaults, alternating",
}


def state_floor(decays=MLPLOpt.momentum_decays, rms_decay: float = MLPLOpt.rms_decay):
    """The per-parameter MLP's accumulator update alone, as an optax transformation.

    Args:
      decays: momentum decays (the MLP's defaults).
      rms_decay: decay of the mean of squared gradients.

    Returns:
      A transformation whose state is the MLP's (momenta [K, *shape] and rms per leaf),
      advanced by `lopt.common.moment_features` as the MLP advances it, and whose update is
      `-1e-3 * momentum(0.9) / sqrt(rms)`, so the accumulators are not dead code.
    """
    d = jnp.asarray(decays, jnp.float32)

    def init(params):
        return jax.tree.map(
            lambda p: (jnp.zeros((len(decays),) + p.shape), jnp.zeros(p.shape)), params
        )

    def update(grads, state, params=None, **extra):
        del params, extra

        def leaf(g, s):
            # The MLP's own accumulator update (its feature rows go unused: XLA drops them).
            acc = moment_features(g, g, jnp.isfinite(g), *s, d, rms_decay)
            return -1e-3 * acc.momenta[1] * jax.lax.rsqrt(acc.rms + EPS), (acc.momenta, acc.rms)

        leaves, treedef = jax.tree.flatten(grads)
        out = [leaf(g, s) for g, s in zip(leaves, treedef.flatten_up_to(state), strict=True)]
        updates = jax.tree.unflatten(treedef, [u for u, _ in out])
        new_state = jax.tree.unflatten(treedef, [s for _, s in out])
        return updates, new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _stepper(tx: optax.GradientTransformationExtraArgs, options: dict[str, Any]):
    """A jitted update with donated state, as a training loop runs it."""

    def step(grads, state, params, loss):
        return tx.update(grads, state, params, loss=loss)

    return jax.jit(step, donate_argnums=(1,), compiler_options=options)


def _time_calls(step, grads, state, params, loss, calls: int) -> tuple[float, Any]:
    """Seconds per call over `calls` calls (after the state has been warmed)."""
    start = time.perf_counter()
    for _ in range(calls):
        updates, state = step(grads, state, params, loss)
    jax.block_until_ready((updates, state))
    return (time.perf_counter() - start) / calls, state


def parse_variant(spec: str) -> tuple[str, str, dict[str, Any]]:
    """`NAME=KIND:KEY=VALUE,KEY=VALUE` → (name, kind, options); values are TOML (a list's
    commas inside its brackets: `momentum_decays=[0.9,0.99]`)."""
    import tomllib  # noqa: PLC0415

    name, sep, rest = spec.partition("=")
    kind, _, opts = rest.partition(":")
    if not sep or not name or not kind:
        raise ValueError(f"--lopt {spec!r}: expected NAME=KIND[:KEY=VALUE,...]")
    options = {}
    for item in filter(None, _top_level_items(opts)):
        key, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--lopt {spec!r}: option {item!r} is not KEY=VALUE")
        try:
            options[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            options[key] = raw
    return name, kind, options


def _top_level_items(text: str) -> list[str]:
    """`text` split at the commas outside brackets: a TOML list value keeps its commas."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def measure(
    kinds: list[str] | dict[str, tuple[str, dict[str, Any]]],
    rounds: int = 5,
    calls: int = 20,
    seed: int = 0,
    model: str = "1m",
    compiler: str = "lopt",
) -> dict[str, dict[str, Any]]:
    """Update time relative to Adam and state bytes per parameter of each kind.

    Args:
      kinds: learned-optimizer kinds (keys of `lopt.registry.LOPTS`, default options), or
        {name: (kind, options)}.
      rounds: alternating rounds (each times every optimizer once).
      calls: updates per timing.
      seed: seeds θ, parameters and gradients.
      model: which of `MODELS` the parameters are those of.
      compiler: the options the updates are jitted under: 'lopt' (`lopt.compiler_options()`),
        'xla' (XLA's defaults), or 'both': every optimizer under each, in the same rounds
        (rows named f'{name} {XLA_DEFAULTS_SUFFIX}' under XLA's defaults, each ratio against
        Adam under the same options).

    Returns:
      Per name ('adam' and each kind): seconds per update (median over rounds), ratio to
      Adam (median of per-round ratios, and min/max), state bytes per parameter, and the
      target and whether it holds where there is one.
    """
    from lopt.export import as_optax  # noqa: PLC0415
    from lopt.registry import make_lopt  # noqa: PLC0415
    from lopt.xla_options import compiler_options  # noqa: PLC0415

    if compiler not in COMPILER_CHOICES:
        raise ValueError(f"compiler={compiler!r}: expected one of {COMPILER_CHOICES}")
    k_params, k_grads, k_theta = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = cost_params(k_params, model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(k_grads, len(leaves))
    grads = jax.tree.unflatten(
        treedef, [1e-3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )
    loss = jnp.float32(2.3)
    n = num_params(params)
    txs = {"adam": optax.with_extra_args_support(optax.adam(1e-3)), FLOOR: state_floor()}
    if not isinstance(kinds, dict):
        kinds = {kind: (kind, {}) for kind in kinds}
    for name, (kind, options) in kinds.items():
        lopt = make_lopt(kind, **options)
        txs[name] = as_optax(lopt, lopt.init_meta(k_theta), 1000)
    options = {} if compiler == "xla" else compiler_options()
    if compiler == "both":
        txs.update({f"{name} {XLA_DEFAULTS_SUFFIX}": tx for name, tx in list(txs.items())})
    steps, states, sizes = {}, {}, {}
    for name, tx in txs.items():
        steps[name] = _stepper(tx, {} if name.endswith(XLA_DEFAULTS_SUFFIX) else options)
        state = tx.init(params)
        sizes[name] = state_bytes(state) / n
        start = time.perf_counter()
        _, states[name] = _time_calls(steps[name], grads, state, params, loss, 2)  # compile
        print(f"{name}: compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in txs}
    for _ in range(rounds):
        for name in txs:
            t, states[name] = _time_calls(steps[name], grads, states[name], params, loss, calls)
            times[name].append(t)
    out = {}
    for name in txs:
        adam = f"adam {XLA_DEFAULTS_SUFFIX}" if name.endswith(XLA_DEFAULTS_SUFFIX) else "adam"
        ratios = [t / a for t, a in zip(times[name], times[adam], strict=True)]
        row = {
            "seconds": statistics.median(times[name]),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "state_bytes_per_param": sizes[name],
        }
        base = name.removesuffix(f" {XLA_DEFAULTS_SUFFIX}")
        kind = kinds[base][0] if base in kinds else base
        if kind in TARGETS:
            row["target"] = TARGETS[kind]
            row["holds"] = row["ratio"] <= TARGETS[kind]
        out[name] = row
    out["_meta"] = {
        "num_params": n,
        "model": model,
        "rounds": rounds,
        "calls": calls,
        "device": str(jax.devices()[0]),
        "compiler_options": options,
        "compiler": compiler,
    }
    return out


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A markdown table of `measure`'s results."""
    meta = results["_meta"]
    lines = [
        f"{meta['num_params']:,} parameters; {meta['rounds']} rounds × {meta['calls']} updates; "
        f"{meta['device']}; {_COMPILER_LABELS[meta['compiler']]}",
        "",
        "| optimizer | update time / Adam's (median, range) | ms per update | state bytes / param "
        "| target | holds |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if name == "_meta":
            continue
        target = f"≤ {r['target']:g}×" if "target" in r else "—"
        holds = ("yes" if r["holds"] else "NO") if "target" in r else "—"
        lines.append(
            f"| {name} | {r['ratio']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | "
            f"{1e3 * r['seconds']:.2f} | {r['state_bytes_per_param']:.1f} | {target} | {holds} |"
        )
    return "\n".join(lines)


_EXAMPLES = """\
examples:
  %(prog)s
  %(prog)s --kinds mlp,adafac --lopt mlp-small=mlp:hidden_size=8,hidden_layers=1 --rounds 7
  %(prog)s --model 10m --kinds mlp
"""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Measures every optimizer's update time and state size, and prints the table.

    Args:
      argv: the command line's arguments (default: `sys.argv[1:]`).
      prog: the program's name in usage lines (default: `python -m evaluate.measure.lopt_cost`).

    Returns:
      The exit status (0; argument errors exit with 2).
    """
    from lopt.registry import LOPTS  # noqa: PLC0415

    p = argparse.ArgumentParser(
        prog=prog or "python -m evaluate.measure.lopt_cost",
        description=__doc__.split("\n")[0],
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--kinds", default=",".join(sorted(LOPTS)), help="comma-separated kinds")
    p.add_argument(
        "--lopt",
        action="append",
        default=[],
        metavar="NAME=KIND:KEY=VALUE,...",
        help="a learned optimizer with options (repeatable)",
    )
    p.add_argument("--model", choices=sorted(MODELS), default="1m", help="parameters of")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20)
    p.add_argument(
        "--compiler",
        choices=COMPILER_CHOICES,
        default="lopt",
        help="jit the updates under lopt.compiler_options() (default), XLA's defaults, or "
        "both in the same rounds",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    variants = {k: (k, {}) for k in args.kinds.split(",") if k}
    try:
        variants.update({n: (k, o) for n, k, o in map(parse_variant, args.lopt)})
    except ValueError as e:
        p.error(str(e))
    unknown = sorted({k for k, _ in variants.values()} - set(LOPTS))
    if unknown:
        p.error(f"unknown kinds {unknown}; known: {sorted(LOPTS)}")
    if args.rounds < 1 or args.calls < 1:
        p.error("--rounds and --calls must be >= 1")
    results = measure(variants, args.rounds, args.calls, model=args.model, compiler=args.compiler)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    from meta_train.cli import run_tool

    sys.exit(run_tool(main))
