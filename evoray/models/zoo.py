"""The embedded model zoo: a tiny base model and domain experts, built offline in minutes.

Tests, the demo and new users need real checkpoints to merge without a model hub. ``build_zoo``
makes them deterministically from a seed: a word-level tokenizer over the generated vocabulary
(``evoray.tasks.suite``), a small BERT pretrained with masked-LM on text from every domain (the
shared base, as a public pretrained model would be), and one expert per domain fine-tuned from
it for sequence classification. Everything is saved as ordinary HF folders (safetensors) under one
root with a ``zoo.json`` manifest; a second call with the same settings reuses them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from evoray.tasks.evaluation import classification_scores, encode
from evoray.tasks.suite import GENERAL, LABELS, SPECIAL_TOKENS, TaskSuite, make_suite

log = logging.getLogger(__name__)
ZOO_VERSION = 1


@dataclass(frozen=True)
class ZooSpec:
    """Everything that determines the zoo's weights; part of its cache key."""

    seed: int = 0
    n_domains: int = 4
    n_ood: int = 2
    hidden_size: int = 128
    num_layers: int = 2
    pretrain_steps: int = 300
    finetune_epochs: int = 15
    batch_size: int = 32
    general_epochs: int = 6
    pretrain_lr: float = 2e-3
    finetune_lr: float = 3e-4

    @property
    def key(self) -> str:
        return f"zoo-v{ZOO_VERSION}-s{self.seed}-d{self.n_domains}-h{self.hidden_size}"


@dataclass(frozen=True)
class Zoo:
    """Paths of a built zoo plus the task suite its experts were trained on."""

    root: Path
    spec: ZooSpec
    suite: TaskSuite
    base: Path
    experts: dict[str, Path]

    @property
    def tokenizer_path(self) -> Path:
        return self.base


def default_root() -> Path:
    """``$EVORAY_HOME/zoo`` (default ``~/.cache/evoray/zoo``)."""
    home = os.environ.get("EVORAY_HOME") or Path.home() / ".cache" / "evoray"
    return Path(home) / "zoo"


def make_tokenizer(suite: TaskSuite, max_length: int = 32) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the suite's invented vocabulary, BERT-style specials."""
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *suite.vocab))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def _bert_config(spec: ZooSpec, vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=4,
        intermediate_size=spec.hidden_size * 2,
        max_position_embeddings=32,
        type_vocab_size=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )


def _batches(n: int, batch_size: int, rng: random.Random):
    order = list(range(n))
    rng.shuffle(order)
    for start in range(0, n, batch_size):
        yield torch.tensor(order[start : start + batch_size])


def _pretrain(spec: ZooSpec, suite: TaskSuite, tokenizer, config: BertConfig) -> dict:
    """Masked-LM on mixed-domain text; returns the encoder weights."""
    torch.manual_seed(spec.seed)
    model = BertForMaskedLM(config)
    text = suite.mixed_train(n_per_domain=1024)
    enc = tokenizer(list(text["text"]), padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"]
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr)
    rng = random.Random(spec.seed)
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    step = 0
    while step < spec.pretrain_steps:
        for idx in _batches(len(ids), spec.batch_size * 2, rng):
            batch = ids[idx].clone()
            mask = (torch.rand(batch.shape, generator=gen) < 0.15) & ~special[idx]
            labels = torch.where(mask, batch, torch.full_like(batch, -100))
            batch[mask] = tokenizer.mask_token_id
            loss = model(input_ids=batch, attention_mask=attn[idx], labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= spec.pretrain_steps:
                break
    return {k: v for k, v in model.state_dict().items() if k.startswith("bert.")}


def finetune(
    model: BertForSequenceClassification,
    tokenizer,
    train,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> BertForSequenceClassification:
    """Plain AdamW fine-tuning on a ``text``/``label`` split (deterministic given seed)."""
    split = encode(tokenizer, train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in _batches(len(split), batch_size, rng):
            out = model(
                input_ids=split.input_ids[idx],
                attention_mask=split.attention_mask[idx],
                labels=split.labels[idx],
            )
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    model.eval()
    return model


def save_model_folder(model, tokenizer, path: Path) -> None:
    """Save model and tokenizer into ``path`` via a sibling ``.partial`` folder and a rename,
    so an interrupted build never leaves a half-written zoo model behind."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def build_zoo(
    root: str | Path | None = None,
    spec: ZooSpec | None = None,
    *,
    force: bool = False,
    report: Callable[[str], None] = print,
) -> Zoo:
    """Build (or reuse) the zoo under ``root``; returns its paths.

    Reuse is keyed by ``ZooSpec`` and checked against the manifest, so changing any setting
    builds a new zoo beside the old one instead of silently reusing stale weights.
    """
    spec = spec or ZooSpec()
    root = Path(root) if root is not None else default_root()
    zoo_dir = root / spec.key
    manifest = zoo_dir / "zoo.json"
    suite = make_suite(spec.seed, spec.n_domains, spec.n_ood)
    if manifest.is_file() and not force:
        data = json.loads(manifest.read_text())
        if data.get("spec") == asdict(spec):
            return _zoo_from_manifest(zoo_dir, spec, suite, data)
    zoo_dir.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    # One thread: faster for models this small, and the same float results on any machine.
    torch.set_num_threads(1)
    try:
        return _build(zoo_dir, spec, suite, report)
    finally:
        torch.set_num_threads(threads)


def _build(zoo_dir: Path, spec: ZooSpec, suite: TaskSuite, report: Callable[[str], None]) -> Zoo:
    manifest = zoo_dir / "zoo.json"
    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    tokenizer = make_tokenizer(suite)
    config = _bert_config(spec, len(tokenizer))
    report(f"zoo: pretraining base ({spec.pretrain_steps} masked-LM steps)")
    encoder = _pretrain(spec, suite, tokenizer, config)
    torch.manual_seed(spec.seed + 1)  # the classification head's init, shared by all experts
    base = BertForSequenceClassification(config)
    missing = base.load_state_dict(encoder, strict=False).missing_keys
    assert all(k.startswith(("classifier.", "bert.pooler.")) for k in missing), missing
    # Like a public sentiment-tuned checkpoint: the base knows the task on generic cue words,
    # the experts then learn their own domain's cues on top of it.
    report(f"zoo: tuning base on the general domain ({spec.general_epochs} epochs)")
    finetune(
        base,
        tokenizer,
        suite.dataset(GENERAL)["train"],
        epochs=spec.general_epochs,
        lr=spec.pretrain_lr / 2,
        batch_size=spec.batch_size,
        seed=spec.seed,
    )
    save_model_folder(base, tokenizer, zoo_dir / "base")
    experts, scores = {}, {}
    for i, name in enumerate(suite.domain_names):
        model = BertForSequenceClassification.from_pretrained(zoo_dir / "base")
        data = suite.dataset(name)
        finetune(
            model,
            tokenizer,
            data["train"],
            epochs=spec.finetune_epochs,
            lr=spec.finetune_lr,
            batch_size=spec.batch_size,
            seed=spec.seed * 100 + i,
        )
        scores[name] = classification_scores(model, encode(tokenizer, data["dev"]))["accuracy"]
        report(f"zoo: expert {name}: dev accuracy {scores[name]:.3f}")
        experts[name] = zoo_dir / f"expert-{name}"
        save_model_folder(model, tokenizer, experts[name])
    data = {
        "version": ZOO_VERSION,
        "spec": asdict(spec),
        "base": "base",
        "experts": {k: v.name for k, v in experts.items()},
        "ood": suite.ood_names,
        "expert_dev_accuracy": scores,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    manifest.write_text(json.dumps(data, indent=2))
    report(f"zoo: built in {data['build_seconds']} s at {zoo_dir}")
    return _zoo_from_manifest(zoo_dir, spec, suite, data)


def _zoo_from_manifest(zoo_dir: Path, spec: ZooSpec, suite: TaskSuite, data: dict) -> Zoo:
    return Zoo(
        root=zoo_dir,
        spec=spec,
        suite=suite,
        base=zoo_dir / data["base"],
        experts={k: zoo_dir / v for k, v in data["experts"].items()},
    )
