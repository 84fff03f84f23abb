"""The models of a search: base and members, loaded only through the checkpoint safety checks.

Every place that instantiates a population model (workers, merger statistics, the results
table) goes through ``load_model`` here, so pickle-only weights and custom code (``auto_map``)
are refused the same way everywhere, and the model class follows the checkpoint's architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evoray.errors import CheckpointError

# Architecture-name suffix -> the transformers auto class that builds it.
_AUTO_CLASSES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
)


@dataclass(frozen=True)
class ModelPool:
    """Base and members of a search (folders, files or hub ids) and how to load them.

    ``member_tasks`` names each member's own task (the zoo's experts), where Fisher / RegMean
    statistics should be computed on that task's data rather than on all tasks."""

    members: tuple[str, ...]
    base: str | None = None
    member_tasks: tuple[str, ...] | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def load(self, path: str, **kwargs: Any) -> tuple[Any, Any]:
        """``(model, tokenizer)`` of one member (or the base), through the safety checks."""
        return load_model(
            path,
            allow_pickle=self.allow_pickle,
            trust_remote_code=self.trust_remote_code,
            **kwargs,
        )

    def layout(self) -> Any:
        """The shared weight layout; a ``LayoutError`` names the first model and tensor that
        differ (another architecture or vocabulary), before any work starts."""
        from evoray.weights.checkpoint import open_checkpoint
        from evoray.weights.layout import Layout

        with open_checkpoint(self.members[0], allow_pickle=self.allow_pickle) as first:
            layout = Layout.from_checkpoint(first)
        for m in [*self.members[1:], *([self.base] if self.base else [])]:
            with open_checkpoint(m, allow_pickle=self.allow_pickle) as ckpt:
                layout.check(ckpt)
        return layout


def zoo_pool(zoo_args: dict[str, Any]) -> tuple[ModelPool, Any]:
    """The embedded zoo (built on first use) as a model pool, and the tasks it was made for."""
    from evoray.models.zoo import ZooSpec, build_zoo
    from evoray.tasks.pool import ZooTasks

    args = dict(zoo_args)
    root = args.pop("root", None)
    zoo = build_zoo(root, ZooSpec(**args))
    pool = ModelPool(
        members=tuple(str(p) for p in zoo.experts.values()),
        base=str(zoo.base),
        member_tasks=tuple(zoo.experts),
    )
    tasks = ZooTasks(seed=zoo.spec.seed, n_domains=zoo.spec.n_domains, n_ood=zoo.spec.n_ood)
    return pool, tasks


def model_class_name(config: dict[str, Any] | None) -> str:
    """The auto class for a config's ``architectures`` (sequence classifiers by default)."""
    for arch in (config or {}).get("architectures") or []:
        for suffix, auto in _AUTO_CLASSES:
            if arch.endswith(suffix):
                return auto
    return "AutoModelForSequenceClassification"


def load_model(
    path: str, *, allow_pickle: bool = False, trust_remote_code: bool = False, **kwargs: Any
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of one checkpoint, as its own architecture class, through the
    checkpoint checks (missing path, pickle, custom code are clear errors)."""
    import transformers
    from transformers.utils import logging as hf_logging

    from evoray.weights.loading import load_model as load_checked
    from evoray.weights.sources import read_config, resolve_model_folder

    hf_logging.disable_progress_bar()
    folder = resolve_model_folder(path, allow_pickle=allow_pickle)
    model_cls = getattr(transformers, model_class_name(read_config(folder)))
    model = load_checked(
        folder,
        model_cls=model_cls,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        **kwargs,
    )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(
            str(folder), trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: no usable tokenizer in {folder} ({exc}); save the tokenizer with the model"
        ) from None
    return model, tok
