"""Which template (task shape) each task group trains, at every outer step.

Particles of different shapes cannot share a vmap, so the particles are split into groups
and each group holds tasks of one template. With `switch_every = N > 0` the groups take on
new shapes during a run, one group at a time:

* the templates form a sequence of cycles; each cycle is a random permutation of all the
  family's templates (keyed by the run's seed), so every template is visited once per cycle.
  With kind weights (`task_family.kind_weights`) only the first cycle is a permutation,
  so every template is still visited; later items are drawn with the weights' template
  probabilities;
* at the start, group g takes sequence item g;
* at the start of outer step s (s > 0, s a multiple of N) the next group in turn,
  (s / N - 1) mod G, takes the next unused item and starts fresh particles (staggered as
  at the start of the run); its PES accumulators restart with them.

So a group keeps a template for G · N outer steps, every template is in play within
(T - G) · N outer steps (T templates, G groups), and at any time only one group is in its
first G · N steps after a switch, which keeps the particles' phases spread out. Everything
is a function of (seed, step): a resumed run holds the same templates as an uninterrupted
one. Compilation stays bounded by the number of templates: one group step and one group
initialisation per template, and one outer update for all (`meta_train.learner`).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


@dataclasses.dataclass(frozen=True)
class TemplateSchedule:
    """The templates of G groups over a run.

    Attributes:
      num_templates: templates of the family (T).
      groups: task groups (G).
      switch_every: outer steps between switches (N; 0: never).
      seed: the run's seed (orders the cycles).
      probs: per-template probabilities of the items after the first cycle (None: every
        cycle a permutation).
    """

    num_templates: int
    groups: int
    switch_every: int = 0
    seed: int = 0
    probs: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.num_templates < 1 or self.groups < 1 or self.switch_every < 0:
            raise ValueError(f"invalid schedule {self}")

    @functools.lru_cache(maxsize=64)  # noqa: B019 - frozen, hashable; few cycles per run
    def _cycle(self, c: int) -> tuple[int, ...]:
        rng = np.random.default_rng([self.seed, 7919, c])
        return tuple(int(t) for t in rng.permutation(self.num_templates))

    def item(self, i: int) -> int:
        """Template number `i` of the sequence."""
        if self.probs is not None and i >= self.num_templates:
            rng = np.random.default_rng([self.seed, 7919, 1, i])
            return int(rng.choice(self.num_templates, p=np.asarray(self.probs) / sum(self.probs)))
        return self._cycle(i // self.num_templates)[i % self.num_templates]

    def switches_done(self, step: int) -> int:
        """Switches made before outer step `step` runs (including one at its start)."""
        return step // self.switch_every if self.switch_every else 0

    def switching_group(self, step: int) -> int | None:
        """The group that takes a new template at the start of outer step `step`, or None."""
        if self.switch_every and step > 0 and step % self.switch_every == 0:
            return (step // self.switch_every - 1) % self.groups
        return None

    def templates_at(self, step: int) -> tuple[int, ...]:
        """The template of every group while outer step `step` (0-based) runs."""
        n = self.switches_done(step)
        out = []
        for g in range(self.groups):
            # Switch j (1-based) goes to group (j - 1) mod G and takes item G + j - 1.
            last = g + 1 + ((n - g - 1) // self.groups) * self.groups if n > g else 0
            out.append(self.item(self.groups + last - 1 if last else g))
        return tuple(out)

    def held_at(self, done: int) -> tuple[int, ...]:
        """The templates a learner state holds after `done` outer steps (a checkpoint's)."""
        return self.templates_at(max(done - 1, 0))

    def visited(self, steps: int) -> set[int]:
        """Templates in play during the first `steps` outer steps."""
        n = self.switches_done(max(steps - 1, 0))
        return {self.item(i) for i in range(self.groups + n)}
