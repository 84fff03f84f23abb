"""Tiny, deterministic, offline models and tokenizers for tests.

Nothing here touches the network: the tokenizer is built from a fixed word list and the models
from small configs, so tests run anywhere in seconds.  A "fine-tune" starts from a base model's
weights and is moved by a few SGD steps or by seeded noise, which is all merge tests need.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "<s>", "</s>", "[CLS]", "[SEP]", "[MASK]"]
_WORD_TEXT = (
    "the a an of to in on at by for with from and or but not is are was were be been has have "
    "had do does did will can may cat dog bird fish tree river stone cloud rain sun moon star "
    "red blue green small large fast slow old new good bad run walk fly"
)
WORDS = _WORD_TEXT.split()
VOCAB = SPECIAL_TOKENS + WORDS
VOCAB_SIZE = len(VOCAB)  # 64
assert VOCAB_SIZE == 64, VOCAB_SIZE

ARCHS = ("llama", "gpt2", "bert")


def make_tokenizer(path: Path) -> Path:
    """Save a word-level fast tokenizer over the fixed 64-token ``VOCAB`` into ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )
    path.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(path))
    return path


def tiny_config(arch: str = "llama", **overrides: Any) -> Any:
    """A transformers config with hidden size 32, 2 layers and the 64-token vocab."""
    from transformers import BertConfig, GPT2Config, LlamaConfig

    common = {"vocab_size": VOCAB_SIZE, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}
    if arch == "llama":
        kw = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "tie_word_embeddings": False,
        }
        return LlamaConfig(**{**common, **kw, **overrides})
    if arch == "gpt2":
        kw = {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 128}
        return GPT2Config(**{**common, **kw, **overrides})
    if arch == "bert":
        kw = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
        }
        return BertConfig(**{**common, **kw, **overrides})
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def model_class(arch: str) -> Any:
    """The transformers class with a head for ``arch`` (causal LM, or masked LM for bert)."""
    from transformers import BertForMaskedLM, GPT2LMHeadModel, LlamaForCausalLM

    classes = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel, "bert": BertForMaskedLM}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return classes[arch]


def sample_ids(seed: int, batch: int = 4, length: int = 16) -> torch.Tensor:
    """Deterministic token ids over the word part of the vocab (no specials)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(len(SPECIAL_TOKENS), VOCAB_SIZE, (batch, length), generator=g)


def make_tiny_model(
    path: Path,
    *,
    arch: str = "llama",
    seed: int = 0,
    base: Path | None = None,
    steps: int = 0,
    noise: float = 0.0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    safe_serialization: bool = True,
    **config_overrides: Any,
) -> Path:
    """Build, optionally "fine-tune", and save a tiny model plus tokenizer into ``path``.

    Without ``base`` the weights are a seeded random init of ``tiny_config(arch, **overrides)``.
    With ``base`` they start from that saved model (overrides are not allowed then) and move by
    ``steps`` SGD steps on seeded random text and/or seeded gaussian ``noise`` on every float
    parameter.  ``safe_serialization=False`` writes pickle ``pytorch_model*.bin`` files instead.
    Deterministic given the arguments.
    """
    cls = model_class(arch)
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if base is None:
            model = cls(tiny_config(arch, **config_overrides))
        else:
            if config_overrides:
                raise ValueError("config overrides cannot be combined with base=")
            model = cls.from_pretrained(str(base), dtype=torch.float32)
        model = model.float()
        model.eval()  # no dropout: keeps the "training" deterministic

        if steps:
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            for step in range(steps):
                ids = sample_ids(seed * 1000 + step)
                loss = model(input_ids=ids, labels=ids).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
        if noise:
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for _, p in sorted(model.named_parameters()):
                    if p.is_floating_point():
                        p.add_(torch.randn(p.shape, generator=g) * noise)

    model = model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(path), **save_kw)
    if not safe_serialization:
        _safetensors_to_pickle(path)
    make_tokenizer(path)
    return path


def _safetensors_to_pickle(folder: Path) -> None:
    """Rewrite a save_pretrained folder's weights as pytorch_model*.bin (transformers 5 only
    saves safetensors), keeping tensor names and shard layout."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        renamed = {
            shard: shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            for shard in dict.fromkeys(data["weight_map"].values())
        }
        for shard, new in renamed.items():
            torch.save(load_file(str(folder / shard)), folder / new)
            (folder / shard).unlink()
        data["weight_map"] = {k: renamed[v] for k, v in data["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(data, indent=2))
        index.unlink()
    else:
        single = folder / "model.safetensors"
        torch.save(load_file(str(single)), folder / "pytorch_model.bin")
        single.unlink()


def make_fake_hub_cache(
    cache: Path, repo_id: str, source: Path, *, commit: str = "0" * 40, ref: str = "main"
) -> Path:
    """Lay out ``source``'s files as the huggingface_hub cache would for ``repo_id``.

    Returns the snapshot folder.  Point ``HF_HUB_CACHE`` at ``cache`` to use it offline.
    """
    import shutil

    repo_dir = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in Path(source).iterdir():
        if f.is_file():
            shutil.copyfile(f, snapshot / f.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit)
    return snapshot
