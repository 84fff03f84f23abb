"""The models of a search: base and members, loaded only through the checkpoint safety checks.

Every place that instantiates a population model (workers, merger statistics, the results
table) goes through ``load_model`` here, so pickle-only weights and custom code (``auto_map``)
are refused the same way everywhere, and the model class follows the checkpoint's architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evoray.errors import CheckpointError, ConfigError

# Architecture-name suffix -> the transformers auto class that builds it.
_AUTO_CLASSES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForConditionalGeneration", "AutoModelForSeq2SeqLM"),
)
# The auto class -> the kind of model a task pool must be made for.
MODEL_KINDS = {
    "AutoModelForSequenceClassification": "classifier",
    "AutoModelForCausalLM": "causal_lm",
    "AutoModelForSeq2SeqLM": "seq2seq",
}
# Task kinds -> the model kind they score (a TaskPool may instead say ``model_kind`` itself).
TASK_MODEL_KINDS = {
    "zoo": "classifier",
    "classification": "classifier",
    "text": "causal_lm",
    "qa": "causal_lm",
    "lm_eval": "causal_lm",
}
_KIND_WORDS = {"classifier": "classifier", "causal_lm": "causal LM", "seq2seq": "seq2seq LM"}


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

    @property
    def paths(self) -> list[str]:
        """Members, then the base if any."""
        return [*self.members, *([self.base] if self.base else [])]

    def layout(self) -> Any:
        """The shared weight layout: every floating tensor of the checkpoint, heads included
        (a tied head counted once). A ``LayoutError`` names the two models and the first
        config field (architecture, vocabulary) or tensor that differs, before any work."""
        from evoray.weights.checkpoint import open_checkpoint
        from evoray.weights.layout import Layout, check_same_architecture

        first_path = self.members[0]
        with open_checkpoint(first_path, allow_pickle=self.allow_pickle) as first:
            layout = Layout.for_model(first)
            first_config = first.config
        for m in self.paths[1:]:
            with open_checkpoint(m, allow_pickle=self.allow_pickle) as ckpt:
                check_same_architecture({first_path: first_config, m: ckpt.config})
                _check_same_tying(first_path, first_config, m, ckpt.config)
                layout.check(ckpt)
        self.check_vocabularies()
        return layout

    def check_vocabularies(self) -> None:
        """A ``LayoutError`` when two models' tokenizers give one token id different tokens:
        embedding rows would be merged across different tokens (same shapes, so the tensor
        check cannot see it). Ids only one tokenizer has (added tokens) are allowed."""
        from evoray.errors import LayoutError
        from evoray.weights.sources import resolve_model_folder

        ref_path, ref = None, None
        for m in self.paths:
            if Path(m).is_file():  # a bare weights file: no tokenizer to compare
                continue
            folder = resolve_model_folder(m, allow_pickle=self.allow_pickle)
            vocab = read_vocabulary(folder)
            if vocab is None:
                continue
            if ref is None:
                ref_path, ref = m, vocab
                continue
            for i in sorted(set(ref) & set(vocab)):
                if ref[i] != vocab[i]:
                    raise LayoutError(
                        f"token id {i} is {vocab[i]!r} in the tokenizer of {m} but {ref[i]!r} "
                        f"in {ref_path}: models to merge must share one vocabulary"
                    )

    def model_kind(self) -> str:
        """``classifier``, ``causal_lm`` or ``seq2seq``: what the members' config builds."""
        return member_kind(self.members[0], allow_pickle=self.allow_pickle)

    def check_tasks(self, tasks: Any) -> None:
        """Refuse tasks made for another kind of model (a causal LM on the classification zoo
        would get a random, never-evolved head and a noise fitness)."""
        check_model_for_tasks(self.members[0], tasks, allow_pickle=self.allow_pickle)


def zoo_pool(zoo_args: dict[str, Any]) -> tuple[ModelPool, Any]:
    """The embedded zoo (built on first use) as a model pool, and the tasks it was made for."""
    from evoray.models.zoo import ZooSpec, build_zoo
    from evoray.tasks.pool import ZooTasks

    args = dict(zoo_args)
    root = args.pop("root", None)
    kind = args.pop("kind", "classifier")
    if kind == "causal_lm":
        return _lm_zoo_pool(root, args)
    if kind != "classifier":
        raise ConfigError(f"models.zoo.kind: unknown {kind!r}; supported: classifier, causal_lm")
    zoo = build_zoo(root, ZooSpec(**args))
    pool = ModelPool(
        members=tuple(str(p) for p in zoo.experts.values()),
        base=str(zoo.base),
        member_tasks=tuple(zoo.experts),
    )
    tasks = ZooTasks(seed=zoo.spec.seed, n_domains=zoo.spec.n_domains, n_ood=zoo.spec.n_ood)
    return pool, tasks


def _lm_zoo_pool(root: str | None, args: dict[str, Any]) -> tuple[ModelPool, Any]:
    """The causal-LM zoo's experts and the qa/text task pool over the skill files it wrote."""
    from dataclasses import fields

    from evoray.models.lm_zoo import LMZooSpec, build_lm_zoo
    from evoray.tasks.pool import make_task_pool

    allowed = [f.name for f in fields(LMZooSpec)]
    for key in args:
        if key not in allowed:
            raise ConfigError(f"models.zoo.{key}: not a setting of the causal_lm zoo ({allowed})")
    zoo = build_lm_zoo(root, LMZooSpec(**args))
    pool = ModelPool(
        members=tuple(str(p) for p in zoo.experts.values()),
        base=str(zoo.base),
        member_tasks=tuple(zoo.experts),
    )
    return pool, make_task_pool(zoo.tasks, source=str(zoo.root / "lm_zoo.json"))


def model_class_name(config: dict[str, Any] | None) -> str:
    """The auto class for a config's ``architectures`` (sequence classifiers by default)."""
    for arch in (config or {}).get("architectures") or []:
        for suffix, auto in _AUTO_CLASSES:
            if arch.endswith(suffix):
                return auto
    return "AutoModelForSequenceClassification"


def _check_same_tying(a: str, ca: dict | None, b: str, cb: dict | None) -> None:
    """A tied and an untied head are different weight spaces (one evolves the head apart)."""
    from evoray.errors import LayoutError
    from evoray.weights.layout import ties_embeddings

    if ca is None or cb is None:
        return
    ta, tb = ties_embeddings(ca), ties_embeddings(cb)
    if ta != tb:
        raise LayoutError(
            f"config field 'tie_word_embeddings' is {tb!r} in {b} but {ta!r} in {a}: models to "
            "merge must share one architecture (tie or untie the head in all of them)"
        )


def read_vocabulary(folder: Any) -> dict[int, str] | None:
    """``{id: token}`` of a model folder's tokenizer files (``tokenizer.json``, else
    ``vocab.json`` or ``vocab.txt``), added tokens included; None if it has none."""
    import json

    folder = Path(folder)
    out: dict[int, str] = {}
    tj = folder / "tokenizer.json"
    try:
        if tj.is_file():
            data = json.loads(tj.read_text(encoding="utf-8"))
            vocab = (data.get("model") or {}).get("vocab")
            if isinstance(vocab, dict):
                out.update({int(i): t for t, i in vocab.items()})
            elif isinstance(vocab, list):  # Unigram: [[token, score], ...]
                out.update({i: entry[0] for i, entry in enumerate(vocab)})
            for tok in data.get("added_tokens") or []:
                out[int(tok["id"])] = tok["content"]
            return out or None
        if (folder / "vocab.json").is_file():
            vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
            return {int(i): t for t, i in vocab.items()}
        if (folder / "vocab.txt").is_file():
            lines = (folder / "vocab.txt").read_text(encoding="utf-8").splitlines()
            return dict(enumerate(lines))
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{folder}: cannot read the tokenizer's vocabulary ({exc})") from None
    return None


def member_kind(path: str, *, allow_pickle: bool = False) -> str:
    """The kind of model ``path``'s config.json builds (``classifier`` when it names none)."""
    from evoray.weights.sources import read_config, resolve_model_folder

    folder = resolve_model_folder(path, allow_pickle=allow_pickle)
    return MODEL_KINDS[model_class_name(read_config(folder))]


def task_model_kinds(tasks: Any) -> dict[str, str]:
    """``{task kind: model kind}`` a task pool needs: its ``model_kind`` if it says, else by
    its ``kind`` (a pool of several kinds lists them in ``kinds``)."""
    own = getattr(tasks, "model_kind", None)
    kinds = list(getattr(tasks, "kinds", None) or [getattr(tasks, "kind", type(tasks).__name__)])
    out = {}
    for k in kinds:
        need = own if isinstance(own, str) else TASK_MODEL_KINDS.get(k)
        if need is not None:
            out[str(k)] = need
    return out


def check_model_for_tasks(path: str, tasks: Any, *, allow_pickle: bool = False) -> None:
    """A ``ConfigError`` naming the model and the task kind when they do not fit."""
    from evoray.errors import ConfigError

    have = member_kind(path, allow_pickle=allow_pickle)
    for task_kind, need in task_model_kinds(tasks).items():
        if need != have:
            hint = (
                "use tasks of kind text, qa or lm_eval (or the causal-LM zoo, models: {zoo: "
                "{kind: causal_lm}})"
                if have == "causal_lm"
                else "use members whose config.json architectures is a *ForCausalLM"
                if need == "causal_lm"
                else f"use {_KIND_WORDS[need]} members"
            )
            raise ConfigError(
                f"model {path} is a {_KIND_WORDS[have]} but task kind {task_kind!r} scores "
                f"{_KIND_WORDS[need]}s: its output head would be created at random and "
                f"never evolved, so its fitness would be noise; {hint}"
            )


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
