"""Task pools: the data a search scores models on, with train / dev / test and OOD splits.

A ``TaskPool`` is small and picklable: it travels to every worker, which encodes its own
splits with the model's tokenizer (data is small, weights are not). ``evaluate`` returns
``{task: {metric: value}}`` for one split; selection uses ``dev``, the final report ``test``
and the OOD sets (``ood-dev``, ``ood-test``). Kinds register in ``TASK_KINDS``; a config's
``tasks: {kind: ..., ...}`` picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from evoray.errors import ConfigError
from evoray.tasks.evaluation import EncodedSplit, classification_scores, encode


class TaskPool(ABC):
    """Named tasks with train/dev/test splits, plus optional out-of-domain tasks."""

    kind: ClassVar[str]

    @abstractmethod
    def names(self) -> list[str]:
        """The in-domain tasks (the fitness is their mean)."""

    def ood_names(self) -> list[str]:
        return []

    @property
    def has_ood(self) -> bool:
        return bool(self.ood_names())

    @abstractmethod
    def encode(self, tokenizer: Any, split: str) -> dict[str, EncodedSplit]:
        """Every task's ``split`` (``train``, ``dev``, ``test``, ``ood-dev``, ``ood-test``)."""

    def evaluate(
        self, model: Any, data: dict[str, EncodedSplit], *, batch_size: int = 512
    ) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}`` of ``model`` on encoded splits (from ``encode``)."""
        return {
            name: classification_scores(model, s, batch_size=batch_size) for name, s in data.items()
        }

    def train_batch(self, tokenizer: Any, tasks: Sequence[str] | None, n: int) -> EncodedSplit:
        """About ``n`` training examples spread over ``tasks`` (all in-domain tasks if None),
        padded to one width: the data merger statistics are computed on."""
        splits = self.encode(tokenizer, "train")
        names = list(tasks) if tasks else list(splits)
        per = max(1, n // len(names))
        parts = [splits[t] for t in names]
        width = max(p.input_ids.shape[1] for p in parts)

        def pad(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(x[:per], (0, width - x.shape[1]), value=value)

        return EncodedSplit(
            torch.cat([pad(p.input_ids, tokenizer.pad_token_id) for p in parts]),
            torch.cat([pad(p.attention_mask, 0) for p in parts]),
            torch.cat([p.labels[:per] for p in parts]),
        )


@dataclass(frozen=True)
class ZooTasks(TaskPool):
    """The generated multi-domain classification suite of ``evoray.tasks.suite``."""

    kind: ClassVar[str] = "zoo"
    seed: int = 0
    n_domains: int = 4
    n_ood: int = 2
    max_length: int = 64

    def _suite(self):
        from evoray.tasks.suite import make_suite

        return make_suite(self.seed, self.n_domains, self.n_ood)

    def names(self) -> list[str]:
        return self._suite().domain_names

    def ood_names(self) -> list[str]:
        return self._suite().ood_names if self.n_ood else []

    def encode(self, tokenizer: Any, split: str) -> dict[str, EncodedSplit]:
        suite = self._suite()
        ood = split.startswith("ood-")
        names = suite.ood_names if ood else suite.domain_names
        part = split.removeprefix("ood-")
        return {
            n: encode(tokenizer, suite.dataset(n)[part], max_length=self.max_length) for n in names
        }


TASK_KINDS: dict[str, type[TaskPool]] = {"zoo": ZooTasks}


def make_task_pool(spec: dict[str, Any], source: str = "<config>") -> TaskPool:
    """The task pool a config's ``tasks:`` section describes."""
    spec = dict(spec)
    kind = spec.pop("kind", "zoo")
    if kind not in TASK_KINDS:
        raise ConfigError(f"{source}: tasks.kind: unknown {kind!r}; supported: {list(TASK_KINDS)}")
    cls = TASK_KINDS[kind]
    allowed = [f.name for f in fields(cls)]
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"{source}: tasks.{key}: not a setting of kind {kind!r} ({allowed})")
    return cls(**spec)
