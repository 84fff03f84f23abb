"""Tiny causal LMs and classifiers of several architectures, and small task pools for them.

Used by the causal-LM model tests and the statistics tests: every model is a seeded random init
(or that init moved by seeded noise) of a 2-layer, 32-wide config over the 64-token test vocab.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from evoray.tasks.evaluation import EncodedSplit, encode_lm, lm_perplexity
from evoray.tasks.pool import TaskPool
from tests.factories import VOCAB_SIZE, make_tokenizer

_COMMON = {"vocab_size": VOCAB_SIZE, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
_DECODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
_ENCODER = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 130,
}

# name -> (config class, model class, config overrides)
CAUSAL = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**_DECODER, "tie_word_embeddings": False}),
    "llama-tied": ("LlamaConfig", "LlamaForCausalLM", {**_DECODER, "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {**_DECODER, "tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_DECODER, "sliding_window": None}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 2, "n_head": 4}),
    "gpt2-untied": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 32, "n_layer": 2, "n_head": 4, "tie_word_embeddings": False},
    ),
}
CLASSIFIERS = {
    "bert": ("BertConfig", "BertForSequenceClassification", {**_ENCODER, "num_labels": 3}),
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        {**_ENCODER, "num_labels": 3, "pad_token_id": 1},
    ),
}

SEQ2SEQ = {
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "d_model": 32,
            "d_ff": 64,
            "d_kv": 8,
            "num_layers": 2,
            "num_heads": 4,
            "decoder_start_token_id": 0,
        },
    ),
}

TEXTS = [
    "the cat is on the tree",
    "a dog can run and walk",
    "the red bird was fast",
    "fish in the river",
    "the sun and the moon are old",
    "a small stone",
]


def make_model(path: Path, arch: str, *, seed: int = 0, noise: float = 0.0, **overrides) -> Path:
    """Save a tiny model of ``arch`` (a key of CAUSAL or CLASSIFIERS) plus tokenizer in
    ``path``; ``noise`` moves every parameter by seeded gaussian noise (a "fine-tune")."""
    import transformers

    cfg_name, cls_name, kw = {**CAUSAL, **CLASSIFIERS, **SEQ2SEQ}[arch]
    config = getattr(transformers, cfg_name)(**{**_COMMON, **kw, **overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, cls_name)(config).float().eval()
        if noise:
            g = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():
                for _, p in sorted(model.named_parameters()):
                    p.add_(torch.randn(p.shape, generator=g) * noise)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path))
    make_tokenizer(path)
    return path


def make_members(root: Path, arch: str, n: int = 4, **overrides) -> tuple:
    """``n`` fine-tunes of one tiny ``arch`` model (seeded noise 0.05, 0.10, ...) and their
    base under ``root``: ``(paths, layout, member flat vectors, base flat vector)``."""
    from evoray.models.pool import ModelPool
    from evoray.weights.checkpoint import open_checkpoint
    from evoray.weights.flat import flatten

    paths = [
        str(make_model(root / f"m{i}", arch, seed=0, noise=0.05 * (i + 1), **overrides))
        for i in range(n)
    ]
    base = str(make_model(root / "base", arch, seed=0, **overrides))
    layout = ModelPool(tuple(paths)).layout()
    flats = []
    for p in [*paths, base]:
        with open_checkpoint(p) as c:
            flats.append(flatten(c, layout).data)
    return paths, layout, flats[:-1], flats[-1]


class TextLogLik(TaskPool):
    """Mean token log-likelihood on a few fixed texts (one task, ``loglik``)."""

    kind: ClassVar[str] = "test_text"
    model_kind: ClassVar[str] = "causal_lm"

    def __init__(self, texts: list[str] | None = None) -> None:
        self.texts = list(texts or TEXTS)

    def names(self) -> list[str]:
        return ["texts"]

    def metric(self, task: str) -> str:
        return "loglik"

    def encode(self, tokenizer: Any, split: str) -> dict[str, EncodedSplit]:
        return {"texts": encode_lm(tokenizer, self.texts)}

    def evaluate(self, model, data, *, batch_size: int = 8) -> dict[str, dict[str, float]]:
        out = {}
        for name, split in data.items():
            nll = lm_perplexity(model, split, batch_size=batch_size)["nll"]
            out[name] = {"loglik": -nll}
        return out

    def train_batch(self, tokenizer: Any, tasks, n: int) -> EncodedSplit:
        return encode_lm(tokenizer, self.texts[:n])


class TinyClassification(TaskPool):
    """Three-label classification of the fixed texts (labels by row), for classifier tests."""

    kind: ClassVar[str] = "test_classification"
    model_kind: ClassVar[str] = "classifier"

    def names(self) -> list[str]:
        return ["texts"]

    def encode(self, tokenizer: Any, split: str) -> dict[str, EncodedSplit]:
        enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
        labels = torch.arange(len(TEXTS)) % 3
        return {"texts": EncodedSplit(enc["input_ids"], enc["attention_mask"], labels)}
