"""The ``classification`` task kind: text (and optional text pair) with a label, label names
mapped onto the classifier head's labels, scored by accuracy / macro F1 or an HF metric."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from evoray.errors import ConfigError
from evoray.tasks.data import is_local
from evoray.tasks.evaluation import EncodedSplit, predict_logits
from evoray.tasks.kinds import TaskEntry, move_to_device, subset_rows, take_rows
from evoray.tasks.metrics import accuracy, hf_metric_scores, macro_f1


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
        return move_to_device(self, device)

    def subset(self, start: int, stop: int) -> ClassData:
        """Rows ``start:stop`` (a contiguous range, as views)."""
        return subset_rows(self, start, stop)

    def take(self, rows: Sequence[int]) -> ClassData:
        """The given rows, in that order (racing's shuffled slices)."""
        return take_rows(self, rows)


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
