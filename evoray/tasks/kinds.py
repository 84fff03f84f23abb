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

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from evoray.errors import ConfigError
from evoray.tasks.data import check_rows, is_local, read_rows
from evoray.tasks.evaluation import EncodedSplit
from evoray.tasks.metrics import hf_metric_scores

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


def move_to_device(obj: Any, device: Any) -> Any:
    moved = {
        k: (v.to(device) if isinstance(v, (torch.Tensor, EncodedSplit)) else v)
        for k, v in obj.__dict__.items()
    }
    return replace(obj, **moved)


def subset_rows(obj: Any, start: int, stop: int) -> Any:
    """``obj`` with every per-row field (tensors, splits, tuples) cut to rows ``start:stop``."""
    sl = slice(start, stop)
    out = {}
    for k, v in obj.__dict__.items():
        if isinstance(v, EncodedSplit):
            out[k] = v.subset(start, stop)
        elif isinstance(v, (torch.Tensor, tuple)) and len(v) == len(obj):
            out[k] = v[sl]
    return replace(obj, **out)


def take_rows(obj: Any, rows: Sequence[int]) -> Any:
    """``obj`` with every per-row field cut to the given ``rows``, in that order (racing's
    shuffled slices; ``subset_rows`` for a contiguous range)."""
    rows = list(rows)
    out = {}
    for k, v in obj.__dict__.items():
        if isinstance(v, EncodedSplit):
            out[k] = v.take(rows)
        elif isinstance(v, torch.Tensor) and len(v) == len(obj):
            out[k] = v[torch.as_tensor(rows, dtype=torch.long, device=v.device)]
        elif isinstance(v, tuple) and len(v) == len(obj):
            out[k] = tuple(v[i] for i in rows)
    return replace(obj, **out)


# -- classification ---------------------------------------------------------------------------


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
        return move_to_device(self, device)

    def subset(self, start: int, stop: int) -> LMData:
        """Rows ``start:stop`` (a contiguous range, as views)."""
        return subset_rows(self, start, stop)

    def take(self, rows: Sequence[int]) -> LMData:
        """The given rows, in that order (racing's shuffled slices)."""
        return take_rows(self, rows)


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
            # float64: the mean is hits / n exactly, as racing's combined slices give it
            out["exact_match"] = float(torch.cat(hits).double().mean())
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
