"""Task kinds over the user's data: ``classification``, ``text`` (causal-LM likelihood) and
``qa`` (prompt/answer pairs). One entry of a config's ``tasks:`` list is one task.

Each task reads and checks its files when the config is loaded (``validate``: missing fields,
empty splits, unreadable files fail before Ray starts), tokenises a split once per worker
(``encode``) and scores a model with batched forward passes only (``evaluate``).

Texts longer than the model's positions: refused by default, naming task, split and example.
With ``max_length`` and ``truncate: true`` they are cut at encoding instead, by a fixed rule:
``text`` keeps the first ``max_length`` tokens; ``qa`` keeps the whole answer and drops prompt
tokens from the left (the end of the prompt, next to the answer, is kept); a ``classification``
input keeps its first ``max_length`` tokens (the tokenizer's ``longest_first`` for pairs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from evoray.errors import ConfigError
from evoray.tasks.data import check_rows, is_local, read_rows
from evoray.tasks.evaluation import EncodedSplit, predict_logits
from evoray.tasks.metrics import accuracy, hf_metric_scores, macro_f1

SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class TaskEntry:
    """What every kind shares: name, weight and metric in the fitness, data and limits."""

    kind: ClassVar[str] = ""
    default_fields: ClassVar[dict[str, str | None]] = {}
    default_metric: ClassVar[str] = ""
    optional_fields: ClassVar[tuple[str, ...]] = ()

    name: str
    weight: float = 1.0
    metric: str = ""
    ood: bool = False
    data: Any = None  # {split: source} or one source (a datasets folder / hub id) for all
    splits: dict[str, str] = field(default_factory=dict)  # evoray split -> the source's name
    fields: dict[str, str | None] = field(default_factory=dict)
    limit: int | None = None
    max_length: int | None = None
    truncate: bool = False
    evaluate_metrics: tuple[str, ...] = ()  # HF `evaluate` metrics: local module paths or names

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", {**self.default_fields, **(self.fields or {})})
        object.__setattr__(self, "metric", self.metric or self.default_metric)
        object.__setattr__(self, "evaluate_metrics", tuple(self.evaluate_metrics or ()))
        unknown = set(self.fields) - set(self.default_fields)
        if unknown:
            raise ConfigError(
                f"task {self.name!r}: fields {sorted(unknown)} are not fields of kind "
                f"{self.kind!r} ({sorted(self.default_fields)})"
            )
        if self.truncate and not self.max_length:
            raise ConfigError(f"task {self.name!r}: truncate: true needs max_length")
        if self.data is None:
            raise ConfigError(f"task {self.name!r}: give data: {{dev: <file>, test: <file>}}")

    # -- data --------------------------------------------------------------------------------

    def split_names(self) -> list[str]:
        """The splits this task has (``dev`` is required, ``train``/``test`` optional)."""
        if isinstance(self.data, dict):
            return [s for s in SPLITS if s in self.data]
        return list(SPLITS)

    def source(self, split: str) -> str:
        if isinstance(self.data, dict):
            if split not in self.data:
                raise ConfigError(
                    f"task {self.name!r} has no {split!r} split; add data.{split}: <file>"
                )
            return str(self.data[split])
        return str(self.data)

    def rows(self, split: str) -> list[dict[str, Any]]:
        source = self.source(split)
        rows = read_rows(source, self.splits.get(split, split), limit=self.limit)
        check_rows(
            rows,
            self.fields,
            source=source,
            task=self.name,
            split=split,
            optional=self.optional_fields,
        )
        return rows

    def validate(self) -> None:
        """Read every local split once (at config load): fields present, no empty split."""
        if isinstance(self.data, dict):
            unknown = set(self.data) - set(SPLITS)
            if unknown:
                raise ConfigError(
                    f"task {self.name!r}: data splits {sorted(unknown)} unknown; use {SPLITS}"
                )
            if "dev" not in self.data:
                raise ConfigError(f"task {self.name!r}: data.dev is required (selection)")
        for split in self.split_names():
            if is_local(self.source(split)):
                self.rows(split)

    def _too_long(self, split: str, index: int, n: int, limit: int, what: str) -> ConfigError:
        return ConfigError(
            f"task {self.name!r}, split {split!r}, example {index}: {what} is {n} tokens, "
            f"more than {limit}. Shorten it, or set max_length and truncate: true (see "
            "evoray.tasks.kinds for the truncation rule)"
        )

    def check_positions(self, model: Any, data: Any) -> None:
        """Refuse examples longer than the model's position embeddings (named, not clipped)."""
        limit = max_positions(model)
        if limit is None:
            return
        lengths = data.lengths
        if lengths.numel() and int(lengths.max()) > limit:
            i = int(torch.argmax((lengths > limit).int()))
            raise self._too_long(data.split_name, i, int(lengths[i]), limit, "the input")

    # -- interface ---------------------------------------------------------------------------

    def check_model(self, config: Any) -> None:
        """Checks of the data against a member's model config before Ray starts (labels)."""

    def encode(self, tokenizer: Any, split: str) -> Any:
        raise NotImplementedError

    def evaluate(self, model: Any, data: Any, *, batch_size: int) -> dict[str, float]:
        raise NotImplementedError


def max_positions(model: Any) -> int | None:
    """The model's position limit (``max_position_embeddings`` / ``n_positions``), if any."""
    cfg = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _move(obj: Any, device: Any) -> Any:
    moved = {
        k: (v.to(device) if isinstance(v, (torch.Tensor, EncodedSplit)) else v)
        for k, v in obj.__dict__.items()
    }
    return replace(obj, **moved)


# -- classification ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassData:
    """An encoded classification split: ``labels`` are class ids (-1 until mapped to a head)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    raw_labels: tuple
    lengths: torch.Tensor
    source: str
    split_name: str

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: Any) -> ClassData:
        return _move(self, device)


@dataclass(frozen=True)
class ClassificationTask(TaskEntry):
    """A sequence classifier on the user's labelled texts (accuracy, macro-F1)."""

    kind: ClassVar[str] = "classification"
    default_fields: ClassVar[dict[str, str | None]] = {
        "text": "text",
        "text_pair": None,
        "label": "label",
    }
    optional_fields: ClassVar[tuple[str, ...]] = ("text_pair",)
    default_metric: ClassVar[str] = "accuracy"
    labels: tuple[str, ...] | None = None  # label names in class-id order (else the head's)

    def encode(self, tokenizer: Any, split: str) -> ClassData:
        rows = self.rows(split)
        f = self.fields
        texts = [str(r[f["text"]]) for r in rows]
        pairs = [str(r[f["text_pair"]]) for r in rows] if f["text_pair"] else None
        enc = tokenizer(
            texts,
            pairs,
            padding=True,
            truncation=bool(self.truncate),
            max_length=self.max_length if self.truncate else None,
            return_tensors="pt",
        )
        raw = tuple(r[f["label"]] for r in rows)
        label2id = self._label2id(_folder_config(tokenizer))
        ids = self._map_labels(raw, label2id, self.source(split), None) if label2id else None
        if ids is None and all(_is_int(v) for v in raw):
            ids = [int(v) for v in raw]
        labels = torch.tensor(ids if ids is not None else [-1] * len(raw), dtype=torch.long)
        return ClassData(
            enc["input_ids"],
            enc["attention_mask"],
            labels,
            raw,
            enc["attention_mask"].sum(1),
            self.source(split),
            split,
        )

    def _label2id(self, config: Any) -> dict[str, int] | None:
        """Label name -> class id: the task's ``labels`` list, else the head's own names."""
        if self.labels:
            return {str(n): i for i, n in enumerate(self.labels)}
        l2i = getattr(config, "label2id", None) or {}
        if l2i and not all(str(k).startswith("LABEL_") for k in l2i):
            return {str(k): int(v) for k, v in l2i.items()}
        return None

    def _map_labels(self, raw: tuple, label2id: dict[str, int], source: str, n: int | None):
        out = []
        for v in raw:
            key = str(v)
            if key in label2id:
                out.append(label2id[key])
            elif _is_int(v) and int(v) in label2id.values():
                out.append(int(v))
            else:
                raise ConfigError(
                    f"task {self.name!r}: {source}, field {self.fields['label']!r}: label "
                    f"{v!r} is not one of the head's labels {sorted(label2id)}. Fix the data, "
                    "or list the label names in class-id order as the task's labels:"
                )
        return out

    def check_model(self, config: Any) -> None:
        """Every local split's labels are labels of this head (``config``: a member's model
        config): called on the driver, so a mismatch fails before Ray starts."""
        l2i = self._label2id(config)
        n = int(getattr(config, "num_labels", 0) or 0)
        for split in self.split_names():
            source = self.source(split)
            if not is_local(source):
                continue
            raw = tuple(r[self.fields["label"]] for r in self.rows(split))
            if l2i is not None:
                ids = self._map_labels(raw, l2i, source, None)
            elif all(_is_int(v) for v in raw):
                ids = [int(v) for v in raw]
            else:
                raise ConfigError(
                    f"task {self.name!r}: {source}, field {self.fields['label']!r}: labels are "
                    "names but the model's head has no label names (config.id2label); list "
                    "them in class-id order as the task's labels:"
                )
            bad = [i for i, v in enumerate(ids) if n and not 0 <= v < n]
            if bad:
                raise ConfigError(
                    f"task {self.name!r}: {source}, field {self.fields['label']!r}: label "
                    f"{raw[bad[0]]!r} but the model's head has only {n} labels"
                )

    def evaluate(self, model: Any, data: ClassData, *, batch_size: int) -> dict[str, float]:
        self.check_positions(model, data)
        n_labels = int(getattr(model.config, "num_labels", 0)) or None
        labels = data.labels
        if bool((labels < 0).any()):  # names not mapped at encoding: map to this head now
            l2i = self._label2id(model.config)
            if l2i is None:
                raise ConfigError(
                    f"task {self.name!r}: {data.source}, field {self.fields['label']!r}: "
                    f"labels {sorted({str(v) for v in data.raw_labels})[:5]} are names but the "
                    "model's head has no label names (config.id2label); list them in class-id "
                    "order as the task's labels:"
                )
            labels = torch.tensor(self._map_labels(data.raw_labels, l2i, data.source, n_labels))
        if n_labels is not None and int(labels.max()) >= n_labels:
            i = int(torch.argmax((labels >= n_labels).int()))
            raise ConfigError(
                f"task {self.name!r}: {data.source}, field {self.fields['label']!r}: label "
                f"{data.raw_labels[i]!r} (class id {int(labels[i])}) but the model's head has "
                f"only {n_labels} labels"
            )
        split = EncodedSplit(data.input_ids, data.attention_mask, labels)
        preds = predict_logits(model, split, batch_size=batch_size).argmax(-1).numpy()
        refs = labels.cpu().numpy()
        out = {
            "accuracy": accuracy(preds, refs),
            "macro_f1": macro_f1(preds, refs, num_labels=n_labels),
        }
        for source in self.evaluate_metrics:
            out.update(hf_metric_scores(source, preds.tolist(), refs.tolist()))
        return out


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _folder_config(tokenizer: Any) -> Any:
    """The model config saved next to the tokenizer (a member's folder), if there is one."""
    path = getattr(tokenizer, "name_or_path", "") or ""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        return None


# -- causal LM: text and qa ------------------------------------------------------------------


@dataclass(frozen=True)
class LMData:
    """An encoded causal-LM split: teacher-forced ``split`` (labels -100 where no loss), plus,
    for ``qa``, the answer texts and left-padded prompts for generation."""

    split: EncodedSplit
    lengths: torch.Tensor
    split_name: str
    answers: tuple[str, ...] = ()
    prompt_ids: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    answer_lengths: torch.Tensor | None = None
    tokenizer: Any = None  # decodes generations (qa with generate: true)

    def __len__(self) -> int:
        return len(self.split)

    def to(self, device: Any) -> LMData:
        return _move(self, device)


def _pad(rows: list[list[int]], pad_id: int, *, left: bool = False, value: int | None = None):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def _pad_id(tokenizer: Any) -> int:
    for key in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, key, None)
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def _token_logprobs(model: Any, split: EncodedSplit, batch_size: int):
    """Per batch: (log p of each target, valid mask, argmax == target), targets shifted by one.
    Position ids come from the mask so padding never shifts positions."""
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(split), batch_size):
        sl = slice(start, start + batch_size)
        mask = split.attention_mask[sl].to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = (
            model(
                input_ids=split.input_ids[sl].to(device),
                attention_mask=mask,
                position_ids=positions,
            )
            .logits[:, :-1]
            .float()
        )
        targets = split.labels[sl, 1:].to(device)
        valid = (targets != -100) & (mask[:, :-1] == 1)
        safe = targets.clamp(min=0)
        logp = torch.log_softmax(logits, -1).gather(-1, safe[..., None])[..., 0]
        hit = logits.argmax(-1) == safe
        yield logp * valid, valid, hit | ~valid


@dataclass(frozen=True)
class TextTask(TaskEntry):
    """Mean token log-likelihood of a causal LM on the task's texts (also as perplexity)."""

    kind: ClassVar[str] = "text"
    default_fields: ClassVar[dict[str, str | None]] = {"text": "text"}
    default_metric: ClassVar[str] = "loglik"

    def encode(self, tokenizer: Any, split: str) -> LMData:
        rows = self.rows(split)
        ids = []
        for i, r in enumerate(rows):
            row = tokenizer(str(r[self.fields["text"]]))["input_ids"]
            if self.max_length and len(row) > self.max_length:
                if not self.truncate:
                    raise self._too_long(split, i, len(row), self.max_length, "the text")
                row = row[: self.max_length]
            ids.append(row)
        if max(len(r) for r in ids) < 2:
            raise ConfigError(
                f"task {self.name!r}, split {split!r}: every text is under 2 tokens; nothing "
                "to predict"
            )
        input_ids, mask = _pad(ids, _pad_id(tokenizer))
        labels = input_ids.masked_fill(mask == 0, -100)
        return LMData(EncodedSplit(input_ids, mask, labels), mask.sum(1), split)

    def evaluate(self, model: Any, data: LMData, *, batch_size: int) -> dict[str, float]:
        self.check_positions(model, data)
        total, n = 0.0, 0
        for logp, valid, _ in _token_logprobs(model, data.split, batch_size):
            total += float(logp.sum().double())
            n += int(valid.sum())
        from evoray.tasks.metrics import perplexity

        return {"loglik": total / n, "perplexity": perplexity(-total, n), "tokens": float(n)}


@dataclass(frozen=True)
class QATask(TaskEntry):
    """Prompt/answer pairs: answer log-likelihood (smooth) and greedy exact match.

    ``exact_match`` is 1 when greedy decoding from the prompt produces the answer's tokens.
    By default it is read off the same teacher-forced pass as the likelihood (greedy decoding
    yields the answer iff every answer token is the argmax given the prompt and the answer's
    preceding tokens), so one batched forward pass gives both. ``generate: true`` instead runs
    left-padded greedy generation and compares decoded text (stripped), which also feeds any
    ``evaluate_metrics`` (predictions are the generated strings).
    """

    kind: ClassVar[str] = "qa"
    default_fields: ClassVar[dict[str, str | None]] = {"prompt": "prompt", "answer": "answer"}
    default_metric: ClassVar[str] = "exact_match"
    generate: bool = False

    def encode(self, tokenizer: Any, split: str) -> LMData:
        rows = self.rows(split)
        seqs, labels, prompts, answers, alens = [], [], [], [], []
        for i, r in enumerate(rows):
            p = tokenizer(str(r[self.fields["prompt"]]))["input_ids"]
            answer = str(r[self.fields["answer"]])
            a = tokenizer(answer, add_special_tokens=False)["input_ids"]
            if not a:
                raise ConfigError(
                    f"task {self.name!r}, split {split!r}, example {i}: the answer tokenises "
                    "to nothing"
                )
            if self.max_length and len(p) + len(a) > self.max_length:
                if not self.truncate or len(a) >= self.max_length:
                    raise self._too_long(
                        split, i, len(p) + len(a), self.max_length, "prompt + answer"
                    )
                p = p[len(p) + len(a) - self.max_length :]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
            prompts.append(p)
            answers.append(answer)
            alens.append(len(a))
        pad = _pad_id(tokenizer)
        input_ids, mask = _pad(seqs, pad)
        lab = torch.full_like(input_ids, -100)
        for i, row in enumerate(labels):
            lab[i, : len(row)] = torch.tensor(row)
        prompt_ids, prompt_mask = _pad(prompts, pad, left=True)
        return LMData(
            EncodedSplit(input_ids, mask, lab),
            mask.sum(1),
            split,
            tuple(answers),
            prompt_ids,
            prompt_mask,
            torch.tensor(alens),
            tokenizer,
        )

    def evaluate(self, model: Any, data: LMData, *, batch_size: int) -> dict[str, float]:
        self.check_positions(model, data)
        total, n, ex_ll, hits = 0.0, 0, [], []
        for logp, valid, hit in _token_logprobs(model, data.split, batch_size):
            total += float(logp.sum().double())
            n += int(valid.sum())
            ex_ll.append(logp.sum(1).cpu())
            hits.append(hit.all(1).cpu())
        out = {
            "answer_loglik": total / n,
            "answer_logprob_sum": float(torch.cat(ex_ll).double().mean()),
        }
        if self.generate or self.evaluate_metrics:
            texts = greedy_answers(model, data, batch_size=batch_size)
            em = [t.strip() == a.strip() for t, a in zip(texts, data.answers, strict=True)]
            out["exact_match"] = float(sum(em) / len(em))
            for source in self.evaluate_metrics:
                out.update(hf_metric_scores(source, texts, list(data.answers)))
        else:
            out["exact_match"] = float(torch.cat(hits).float().mean())
        return out


@torch.no_grad()
def greedy_answers(model: Any, data: LMData, *, batch_size: int) -> list[str]:
    """Greedy continuations of the left-padded prompts, each as many tokens as its answer,
    decoded to text."""
    model.eval()
    device = next(model.parameters()).device
    tok = data.tokenizer
    out: list[str] = []
    for start in range(0, len(data), batch_size):
        sl = slice(start, start + batch_size)
        ids = data.prompt_ids[sl].to(device)
        mask = data.prompt_mask[sl].to(device)
        lens = data.answer_lengths[sl]
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=int(lens.max()),
            do_sample=False,
            num_beams=1,
            pad_token_id=_pad_id(tok),
            eos_token_id=None,
        )[:, ids.shape[1] :]
        for row, k in zip(gen.cpu(), lens.tolist(), strict=True):
            out.append(tok.decode(row[:k], skip_special_tokens=True))
    return out
