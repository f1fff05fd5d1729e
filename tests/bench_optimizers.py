"""Optimizer factories that the benchmark tests name as `bench_optimizers:FUNCTION` SPECs."""

import optax


def clipped_adam(learning_rate: float = 3e-3):
    """Adam after global-norm clipping: a user's own optax transformation."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def horizon_cosine(num_steps: int, peak: float = 1e-2):
    """A factory that takes the horizon: the benchmark passes `num_steps`."""
    horizon_cosine.last_num_steps = num_steps
    return optax.adam(optax.cosine_decay_schedule(peak, num_steps))


def not_a_transformation():
    return 42
