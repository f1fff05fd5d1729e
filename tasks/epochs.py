"""How many training steps make one pass over a task's training data.

Overfitting grows with the passes a run makes over its data, not with its steps: a
1,000-step run is 36 epochs of MNIST-1D's 3,600 training examples at batch 128 and half an
epoch of Fashion-MNIST at batch 32. A learned optimizer sees neither the dataset's size nor
the batch's, so a regulariser that should follow the data (a weight decay per epoch,
`lopt.hub.load_pretrained`'s `steps_per_epoch`) takes this number from outside.
"""

from __future__ import annotations

from typing import Any

import jax

from tasks.classification import ClassificationTask
from tasks.language import LanguageModelTask


def steps_per_epoch(task: Any) -> float | None:
    """Training steps per pass over `task`'s training split, or None for a task of a kind
    this does not know (a user's own task, a synthetic problem).

    Classification tasks (MLPs and ConvNets): training examples of the task's dataset ÷ the
    batch size. Language models: training bytes ÷ (batch size × sequence length). Tasks
    seen through an augmentation (`tasks.augment`) count as the task they wrap.

    Args:
      task: one task (not a batch of tasks), with concrete arrays.

    Returns:
      A positive float, or None.
    """
    while not isinstance(task, ClassificationTask | LanguageModelTask):
        if not hasattr(task, "task"):
            return None
        task = task.task
    if isinstance(task, ClassificationTask):
        counts = jax.device_get(task.data.train.counts)
        examples = int(counts[int(jax.device_get(task.hp.dataset))])
        return examples / task.batch_size
    return int(task.train.data.shape[0]) / (task.batch_size * task.seq_len)
