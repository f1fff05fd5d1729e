"""Meta-validation scores of every saved step of a run (e.g. one trained before
meta-validation existed): the same tasks, seeds and score as during training.

    python scripts/validate_checkpoints.py RUN_DIR [section.key=value ...]

Prints one line per step and writes RUN_DIR/valid_scores.json.
"""

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from meta_train.build import build_run
from meta_train.checkpoint import load_theta, saved_steps
from meta_train.config import apply_overrides, from_dict
from meta_train.validation import build_validator


def main(run_dir: str, overrides: list[str]) -> None:
    ckpt = str(Path(run_dir) / "checkpoints")
    steps = saved_steps(ckpt)
    _, saved = load_theta(ckpt, steps[-1])
    config = from_dict(apply_overrides(saved, overrides))
    run = build_run(config)
    validator = build_validator(run)
    rows = [{"step": 0, **validator(run.init_state().theta)}]
    print(rows[-1], flush=True)
    for step in steps:
        t0 = time.perf_counter()
        theta = jax.tree.map(jnp.asarray, load_theta(ckpt, step)[0])
        rows.append({"step": step, **validator(theta)})
        print(rows[-1], f"{time.perf_counter() - t0:.1f}s", flush=True)
    out = Path(run_dir) / "valid_scores.json"
    out.write_text(json.dumps({"tasks": validator.describe(), "scores": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
