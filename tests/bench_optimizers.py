"""Optimizer factories that the benchmark tests name as `bench_optimizers:FUNCTION` SPECs."""

import optax


def clipped_adam(learning_rate: float = 3e-3):
    """Adam after global-norm clipping: a user's own optax transformation."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def horizon_cosine(num_steps: int, peak: float = 1e-2):
    """A factory that takes the horizon: the benchmark passes `num_steps`."""
    horizon_cosine.last_num_steps = num_steps
    return optax.adam(optax.cosine_decay_schedule(peak, num_steps))


def data_aware(num_steps: int, steps_per_epoch: float | None = None):
    """A factory that also takes the task's steps per epoch: the benchmark passes it."""
    data_aware.last_steps_per_epoch = steps_per_epoch
    return optax.adam(1e-3)


def any_keywords(**kwargs):
    """Takes any keyword, names none: gets only the horizon, not steps_per_epoch."""
    any_keywords.last_kwargs = kwargs
    return optax.adam(1e-3)


def dies_in_worker():
    """Adam, except that a benchmark worker process building it dies on the spot (as one
    killed for memory would); the up-front check in the main process passes."""
    import multiprocessing  # noqa: PLC0415
    import os  # noqa: PLC0415

    if multiprocessing.parent_process() is not None:
        os._exit(3)
    return optax.adam(1e-3)


def not_a_transformation():
    return 42
