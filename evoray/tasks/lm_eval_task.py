"""``lm_eval`` tasks: lm-evaluation-harness tasks scored on the in-memory model.

The model is wrapped by lm-eval's own ``HFLM(pretrained=model, tokenizer=tok)``, so weights
rebuilt in place by a worker are what lm-eval scores; nothing is written to disk. A task is an
lm-eval name or a task defined by YAMLs under ``include_path`` (local data files work offline).
Which of the task's splits is evoray's ``dev`` / ``test`` is set by ``splits``; lm-eval scores
its ``test_split`` (else ``validation_split``), so the chosen split is made the test split.
Task objects are built once per process and reused for every offspring.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from evoray.errors import ConfigError
from evoray.tasks.kinds import TaskEntry

INSTALL = "pip install 'evoray[lm-eval]'"

_MANAGERS: dict[tuple[str | None, bool], Any] = {}
_TASKS: dict[tuple, Any] = {}
_LMS: dict[int, tuple[Any, Any, Any]] = {}  # id(model) -> (model, tokenizer, HFLM)


def import_lm_eval() -> Any:
    """The ``lm_eval`` package, or an error that gives the pip command."""
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as exc:
        raise ConfigError(
            f"tasks of kind 'lm_eval' need lm-evaluation-harness, which is not installed "
            f"({exc}); install it with: {INSTALL}"
        ) from None
    return lm_eval


def task_manager(include_path: str | None, task: str | None = None) -> Any:
    """One ``TaskManager`` per include path per process. A task defined under
    ``include_path`` is looked up without lm-eval's own thousands of task YAMLs (indexing those
    takes tens of seconds on a small CPU); other names get the full index."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        key = (include_path, False)
        if key not in _MANAGERS:
            _MANAGERS[key] = TaskManager(include_path=include_path, include_defaults=False)
        if task is not None and task in _MANAGERS[key].all_tasks:
            return _MANAGERS[key]
    key = (include_path, True)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=include_path)
    return _MANAGERS[key]


@dataclass(frozen=True)
class LmEvalData:
    """What ``evaluate`` needs: the tokenizer and the lm-eval split to score."""

    tokenizer: Any
    split_name: str
    lm_split: str

    def to(self, device: Any) -> LmEvalData:
        return self


@dataclass(frozen=True)
class LmEvalTask(TaskEntry):
    """An lm-evaluation-harness task; ``metric`` is one of its metrics (``acc``, ...)."""

    kind: ClassVar[str] = "lm_eval"
    default_metric: ClassVar[str] = "acc"
    task: str = ""
    include_path: str | None = None
    data: Any = "lm_eval"  # lm-eval reads its own data (the task YAML's dataset)
    splits: dict[str, str] = field(default_factory=dict)
    num_fewshot: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "task", self.task or self.name)
        super().__post_init__()

    def split_names(self) -> list[str]:
        return [s for s in ("dev", "test") if s in self.splits] or ["dev"]

    def validate(self) -> None:
        """lm-eval installed, the task known (close names suggested), splits given."""
        tm = task_manager(self.include_path, self.task)
        if self.task not in tm.all_tasks:
            close = difflib.get_close_matches(self.task, tm.all_tasks, n=5, cutoff=0.6)
            hint = f"; close names: {', '.join(close)}" if close else ""
            where = f" (include_path {self.include_path})" if self.include_path else ""
            raise ConfigError(
                f"task {self.name!r}: unknown lm-eval task {self.task!r}{where}{hint}"
            )
        unknown = set(self.splits) - {"dev", "test"}
        if unknown:
            raise ConfigError(f"task {self.name!r}: splits {sorted(unknown)}; use dev and test")

    def _task(self, lm_split: str) -> Any:
        key = (self.task, self.include_path, lm_split, self.num_fewshot)
        if key not in _TASKS:
            from lm_eval.tasks import get_task_dict

            tasks = get_task_dict([self.task], task_manager(self.include_path, self.task))
            leaves = _leaves(tasks)
            for t in leaves.values():
                if lm_split not in t.dataset:
                    raise ConfigError(
                        f"task {self.name!r}: lm-eval task {self.task!r} has no split "
                        f"{lm_split!r} (has {list(t.dataset)}); set splits: {{dev: <name>}}"
                    )
                t._config.test_split = lm_split
                if self.num_fewshot is not None:
                    t.set_config(key="num_fewshot", value=self.num_fewshot)
            _TASKS[key] = tasks
        return _TASKS[key]

    def encode(self, tokenizer: Any, split: str) -> LmEvalData:
        if split == "train":
            raise ConfigError(
                f"task {self.name!r} (lm_eval) has no train split for merger statistics"
            )
        lm_split = self.splits.get(split)
        if not lm_split:  # the task's own: validation for dev, test for test
            cfg = self._task_any().config
            first, second = cfg.validation_split, cfg.test_split
            lm_split = (first or second) if split == "dev" else (second or first)
        self._task(lm_split)  # fail here (worker start), not per offspring
        return LmEvalData(tokenizer, split, lm_split)

    def _task_any(self) -> Any:
        from lm_eval.tasks import get_task_dict

        leaves = _leaves(get_task_dict([self.task], task_manager(self.include_path, self.task)))
        return next(iter(leaves.values()))

    def evaluate(self, model: Any, data: LmEvalData, *, batch_size: int) -> dict[str, float]:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        # One wrapper per model object: a worker rebuilds weights in place, so it stays valid.
        cached = _LMS.get(id(model))
        if cached is None or cached[0] is not model or cached[1] is not data.tokenizer:
            device = next(model.parameters()).device
            lm = HFLM(
                pretrained=model,
                tokenizer=data.tokenizer,
                batch_size=min(batch_size, 64),
                device=str(device),
            )
            _LMS[id(model)] = cached = (model, data.tokenizer, lm)
        lm = cached[2]
        res = evaluate(
            lm,
            self._task(data.lm_split),
            limit=self.limit,
            bootstrap_iters=0,
            log_samples=False,
            verbosity="ERROR",
        )
        out: dict[str, float] = {}
        for _, metrics in res["results"].items():
            for key, value in metrics.items():
                name, _, filt = key.partition(",")
                if "stderr" in name or not isinstance(value, (int, float)):
                    continue
                out[name if filt in ("none", "") else f"{name}_{filt}"] = float(value)
        if self.metric not in out:
            raise ConfigError(
                f"task {self.name!r}: lm-eval task {self.task!r} reports {sorted(out)}, not "
                f"{self.metric!r}; set metric: to one of them"
            )
        return out


def _leaves(task_dict: dict) -> dict[str, Any]:
    """The individual Task objects of a (possibly grouped) lm-eval task dict."""
    from lm_eval.api.task import Task

    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(_leaves(value))
        elif isinstance(value, Task):
            out[str(key)] = value
    return out


def _default_split(task: Any) -> str:
    cfg = task.config
    return cfg.validation_split or cfg.test_split
