"""Task pools: the data a search scores models on, with train / dev / test and OOD splits.

A ``TaskPool`` is small and picklable: it travels to every worker, which encodes its own
splits with the model's tokenizer (data is small, weights are not). ``evaluate`` returns
``{task: {metric: value}}`` for one split; selection uses ``dev``, the final report ``test``
and the OOD sets (``ood-dev``, ``ood-test``). Kinds register in ``TASK_KINDS``; a config's
``tasks: {kind: ..., ...}`` picks one.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from evoray.errors import ConfigError
from evoray.tasks.evaluation import EncodedSplit, classification_scores, encode

logger = logging.getLogger(__name__)


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

    def check_model(self, config: Any) -> None:
        """Refuse data that does not fit a member's model ``config`` (e.g. labels the head
        lacks), on the driver before Ray starts; a no-op for kinds with nothing to check."""
        return None

    def metric(self, task: str) -> str:
        """The metric a task's fitness and result tables use."""
        return "accuracy"

    def weight(self, task: str) -> float:
        return 1.0

    def racing_problems(self) -> list[str]:
        """Why racing cannot bound this pool's fitness: one line per in-domain task whose
        metric is not a mean of per-example scores in [0, 1] (empty: racing applies)."""
        from evoray.strategies.racing import BOUNDED_MEAN_METRICS

        return [
            f"task {t!r} metric {self.metric(t)!r}"
            for t in self.names()
            if self.metric(t) not in BOUNDED_MEAN_METRICS
        ]

    def fitness(self, scores: dict[str, dict[str, float]]) -> float:
        """Weighted mean of each in-domain task's fitness metric (higher is better; a
        lower-is-better metric such as perplexity enters negated). Given only OOD scores (an
        ``ood-*`` split), their mean, for reporting."""
        from evoray.tasks.metrics import LOWER_IS_BETTER

        own = [t for t in scores if t in self.names()] or list(scores)
        if not own:
            raise ValueError("no scores to average")
        total = weights = 0.0
        for t in own:
            m = self.metric(t)
            if m not in scores[t]:
                raise KeyError(f"task {t!r} has no score {m!r} (has {sorted(scores[t])})")
            v = float(scores[t][m])
            total += self.weight(t) * (-v if m in LOWER_IS_BETTER else v)
            weights += self.weight(t)
        return total / weights

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
    dev_size: int | None = None  # dev rows per domain (None: the suite's 128); more, for racing

    def _suite(self):
        from evoray.tasks.suite import make_suite

        return make_suite(self.seed, self.n_domains, self.n_ood)

    def names(self) -> list[str]:
        return self._suite().domain_names

    def ood_names(self) -> list[str]:
        return self._suite().ood_names if self.n_ood else []

    def encode(self, tokenizer: Any, split: str) -> dict[str, EncodedSplit]:
        from evoray.tasks.suite import SPLIT_SIZES

        suite = self._suite()
        ood = split.startswith("ood-")
        names = suite.ood_names if ood else suite.domain_names
        part = split.removeprefix("ood-")
        sizes = None if self.dev_size is None else {**SPLIT_SIZES, "dev": self.dev_size}
        return {
            n: encode(tokenizer, suite.dataset(n, sizes)[part], max_length=self.max_length)
            for n in names
        }


@dataclass(frozen=True)
class MultiTaskPool(TaskPool):
    """Several tasks of any kinds (``evoray.tasks.kinds``, ``lm_eval``), from a ``tasks:`` list.

    ``ood: true`` tasks are scored on ``ood-dev`` / ``ood-test`` (their own dev/test) and never
    enter the fitness."""

    kind: ClassVar[str] = "list"
    tasks: tuple = ()

    def _entry(self, name: str):
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r}; tasks are {[t.name for t in self.tasks]}")

    def names(self) -> list[str]:
        return [t.name for t in self.tasks if not t.ood]

    def ood_names(self) -> list[str]:
        return [t.name for t in self.tasks if t.ood]

    def check_model(self, config: Any) -> None:
        for t in self.tasks:
            t.check_model(config)

    def metric(self, task: str) -> str:
        return self._entry(task).metric

    def weight(self, task: str) -> float:
        return float(self._entry(task).weight)

    def racing_problems(self) -> list[str]:
        """Only classification and qa data can be sliced; their accuracy / exact match are
        bounded means (lm_eval tasks and text log-likelihoods are not)."""
        out = super().racing_problems()
        for t in self.tasks:
            if not t.ood and t.kind not in ("classification", "qa"):
                line = f"task {t.name!r} metric {t.metric!r}"
                out += [] if line in out else [f"{line} (kind {t.kind!r})"]
        return out

    def encode(self, tokenizer: Any, split: str) -> dict[str, Any]:
        ood = split.startswith("ood-")
        part = split.removeprefix("ood-")
        chosen = [t for t in self.tasks if t.ood == ood]
        if part == "test":  # a task without test data is left out of the final report, said so
            missing = [t.name for t in chosen if part not in t.split_names()]
            if missing:
                logger.warning("tasks %s have no test split; not in the test scores", missing)
            chosen = [t for t in chosen if t.name not in missing]
        return {t.name: t.encode(tokenizer, part) for t in chosen}

    def evaluate(
        self, model: Any, data: dict[str, Any], *, batch_size: int = 512
    ) -> dict[str, dict[str, float]]:
        return {
            name: self._entry(name).evaluate(model, d, batch_size=batch_size)
            for name, d in data.items()
        }

    def train_batch(self, tokenizer: Any, tasks: Sequence[str] | None, n: int) -> EncodedSplit:
        """About ``n`` training examples over ``tasks``: class ids (1-D labels) for
        classification, token targets (2-D, -100 where no loss) for text and qa."""
        names = list(tasks) if tasks else self.names()
        per = max(1, n // len(names))
        parts = []
        for name in names:
            d = self._entry(name).encode(tokenizer, "train")
            s = d.split if hasattr(d, "split") else d
            parts.append(EncodedSplit(s.input_ids[:per], s.attention_mask[:per], s.labels[:per]))
        width = max(p.input_ids.shape[1] for p in parts)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

        def pad(x: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        two_d = parts[0].labels.ndim == 2
        if any((p.labels.ndim == 2) != two_d for p in parts):
            raise ConfigError(f"tasks {names}: mixes classification and causal-LM tasks")
        return EncodedSplit(
            torch.cat([pad(p.input_ids, pad_id) for p in parts]),
            torch.cat([pad(p.attention_mask, 0) for p in parts]),
            torch.cat([pad(p.labels, -100) if two_d else p.labels for p in parts]),
        )


TASK_KINDS: dict[str, type[TaskPool]] = {"zoo": ZooTasks}


def _entry_kinds() -> dict[str, type]:
    from evoray.tasks.classification import ClassificationTask
    from evoray.tasks.kinds import QATask, TextTask
    from evoray.tasks.lm_eval_task import LmEvalTask

    return {c.kind: c for c in (ClassificationTask, TextTask, QATask, LmEvalTask)}


PATH_KEYS = ("data", "include_path", "evaluate_metrics")


def _resolve(value: Any, base_dir: Path | None) -> Any:
    """Relative local paths against the config's folder (hub ids, which do not exist as
    paths there, are kept as given)."""
    if base_dir is None or value is None:
        return value
    if isinstance(value, dict):
        return {k: _resolve(v, base_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_resolve(v, base_dir) for v in value]
    p = Path(str(value))
    return str(base_dir / p) if not p.is_absolute() and (base_dir / p).exists() else value


def resolve_task_paths(entries: list[Any], base_dir: Path) -> list[Any]:
    """A ``tasks:`` list with each entry's relative local paths made absolute."""
    out = []
    for entry in entries:
        if isinstance(entry, dict):
            entry = {k: _resolve(v, base_dir) if k in PATH_KEYS else v for k, v in entry.items()}
        out.append(entry)
    return out


def make_task_entry(entry: dict[str, Any], source: str, base_dir: Path | None = None) -> Any:
    """One task of a ``tasks:`` list, its local data checked now (before Ray starts)."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: tasks: each entry must be a mapping, got {entry!r}")
    entry = dict(entry)
    kinds = _entry_kinds()
    kind = entry.pop("kind", None)
    name = entry.get("name")
    if not name:
        raise ConfigError(f"{source}: tasks: an entry has no name ({entry})")
    if kind not in kinds:
        raise ConfigError(
            f"{source}: tasks[{name}].kind: unknown {kind!r}; supported: {sorted(kinds)}"
        )
    cls = kinds[kind]
    allowed = [f.name for f in fields(cls)]
    for key in entry:
        if key not in allowed:
            raise ConfigError(
                f"{source}: tasks[{name}].{key}: not a setting of kind {kind!r} ({allowed})"
            )
    for key in PATH_KEYS:
        if key in entry:
            entry[key] = _resolve(entry[key], base_dir)
    if "labels" in entry and entry["labels"] is not None:
        entry["labels"] = tuple(entry["labels"])
    try:
        task = cls(**entry)
        task.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return task


def make_task_pool(
    spec: dict[str, Any] | list[dict[str, Any]],
    source: str = "<config>",
    base_dir: str | Path | None = None,
) -> TaskPool:
    """The task pool a config's ``tasks:`` section describes: the legacy ``{kind: zoo, ...}``
    mapping, or a list of task entries (``MultiTaskPool``), whose files are read and checked
    here. Relative paths resolve against ``base_dir`` (the config's folder) if given."""
    if isinstance(spec, (list, tuple)):
        base = Path(base_dir) if base_dir is not None else None
        entries = tuple(make_task_entry(e, source, base) for e in spec)
        if not entries:
            raise ConfigError(f"{source}: tasks: the list is empty")
        names = [e.name for e in entries]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{source}: tasks: names {dup} are used twice")
        if all(e.ood for e in entries):
            raise ConfigError(f"{source}: tasks: every task is ood; the fitness needs one")
        return MultiTaskPool(entries)
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
