"""Tests for causal-LM perplexity evaluation (evoray.tasks.evaluation.encode_lm / lm_perplexity)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from evoray.tasks.evaluation import EncodedSplit, encode_lm, lm_perplexity

TEXTS = [
    "the cat run",
    "a small dog was fast and the bird can fly over the river",
    "red sun",
    "the old moon is not new but the star is good",
]


@pytest.fixture(scope="module")
def model(tiny_base: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).eval()


@pytest.fixture
def tokenizer(tiny_base: Path):
    return AutoTokenizer.from_pretrained(str(tiny_base))


def manual_nll(model: LlamaForCausalLM, ids: list[int]) -> tuple[float, int]:
    """Sum of -log p(token t | tokens < t) for one unpadded row, computed in float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    target = torch.tensor(ids[1:])
    return float(-logp[torch.arange(len(target)), target].sum()), len(target)


def test_encode_lm_masks_padding(tokenizer) -> None:
    split = encode_lm(tokenizer, TEXTS)
    assert split.input_ids.shape == split.labels.shape == split.attention_mask.shape
    lengths = [len(t.split()) for t in TEXTS]
    assert split.attention_mask.sum(1).tolist() == lengths
    assert split.input_ids.shape[1] == max(lengths)
    assert (split.labels[split.attention_mask == 0] == -100).all()
    real = split.attention_mask == 1
    assert torch.equal(split.labels[real], split.input_ids[real])
    assert split.attention_mask[0, : lengths[0]].all()  # right padding by default


def test_encode_lm_truncates_and_pads_left(tokenizer) -> None:
    tokenizer.padding_side = "left"
    split = encode_lm(tokenizer, TEXTS, max_length=5)
    assert split.input_ids.shape == (4, 5)
    assert split.attention_mask[2].tolist() == [0, 0, 0, 1, 1]
    assert split.labels[2].tolist()[:3] == [-100] * 3


def test_encode_lm_without_pad_token(tokenizer) -> None:
    tokenizer.pad_token = None  # like GPT-2 / Llama tokenizers
    split = encode_lm(tokenizer, TEXTS)
    assert tokenizer.pad_token is None  # the caller's tokenizer is left alone
    assert (split.labels[split.attention_mask == 0] == -100).all()


def test_encode_lm_rejects_empty(tokenizer) -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_lm(tokenizer, [])


def test_perplexity_matches_manual_computation(model, tokenizer) -> None:
    total, count = 0.0, 0
    for text in TEXTS:
        nll, n = manual_nll(model, tokenizer(text)["input_ids"])
        total, count = total + nll, count + n
    out = lm_perplexity(model, encode_lm(tokenizer, TEXTS), batch_size=3)
    assert out["tokens"] == count == sum(len(t.split()) - 1 for t in TEXTS)
    assert out["nll"] == pytest.approx(total / count, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert 1.0 < out["perplexity"] < 200  # a random 64-token model is near uniform


def test_matches_transformers_loss_on_one_row(model, tokenizer) -> None:
    split = encode_lm(tokenizer, TEXTS[1:2])
    with torch.no_grad():
        loss = model(input_ids=split.input_ids, labels=split.labels).loss
    assert lm_perplexity(model, split)["nll"] == pytest.approx(float(loss), rel=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_invariance(model, tokenizer, side: str) -> None:
    """A text's NLL is the same alone, padded beside a long text, and in any batch size."""
    tokenizer.padding_side = side
    text, long = TEXTS[0], TEXTS[1]
    alone = lm_perplexity(model, encode_lm(tokenizer, [text]))
    padded = encode_lm(tokenizer, [text, long])
    assert padded.attention_mask[0].sum() < padded.input_ids.shape[1]  # really padded
    first_row = EncodedSplit(
        *(t[:1] for t in (padded.input_ids, padded.attention_mask, padded.labels))
    )
    in_batch = lm_perplexity(model, first_row)
    assert in_batch["tokens"] == alone["tokens"]
    assert in_batch["nll"] == pytest.approx(alone["nll"], rel=1e-5, abs=1e-6)
    together = [lm_perplexity(model, padded, batch_size=b)["nll"] for b in (1, 2)]
    assert together[0] == pytest.approx(together[1], rel=1e-5)


def test_left_and_right_padding_agree(model, tokenizer) -> None:
    right = lm_perplexity(model, encode_lm(tokenizer, TEXTS))
    tokenizer.padding_side = "left"
    left = lm_perplexity(model, encode_lm(tokenizer, TEXTS))
    assert left["tokens"] == right["tokens"]
    assert left["nll"] == pytest.approx(right["nll"], rel=1e-5)


def test_masked_prompt_is_not_scored(model, tokenizer) -> None:
    split = encode_lm(tokenizer, TEXTS[1:2])
    labels = split.labels.clone()
    labels[0, :4] = -100  # the caller masks a 4-token prompt: tokens 1..3 are not predicted
    out = lm_perplexity(model, EncodedSplit(split.input_ids, split.attention_mask, labels))
    assert out["tokens"] == lm_perplexity(model, split)["tokens"] - 3


def test_classification_split_is_rejected(model, tokenizer) -> None:
    split = encode_lm(tokenizer, TEXTS)
    wrong = EncodedSplit(split.input_ids, split.attention_mask, torch.zeros(len(TEXTS)))
    with pytest.raises(ValueError, match="encode_lm"):
        lm_perplexity(model, wrong)


def test_nothing_to_predict(model, tokenizer) -> None:
    with pytest.raises(ValueError, match="at least one predicted token"):
        lm_perplexity(model, encode_lm(tokenizer, ["cat", "dog"]))


def test_left_padding_with_absolute_positions(tiny_gpt2: Path) -> None:
    """GPT-2 has learned absolute positions (RoPE in llama hides a shift): left-padded rows must
    get their positions from the attention mask."""
    from transformers import GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel.from_pretrained(str(tiny_gpt2), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_gpt2))
    alone = lm_perplexity(gpt2, encode_lm(tok, TEXTS[:1]))["nll"]
    tok.padding_side = "left"
    padded = encode_lm(tok, TEXTS[:2])
    row = EncodedSplit(*(t[:1] for t in (padded.input_ids, padded.attention_mask, padded.labels)))
    assert padded.attention_mask[0, 0] == 0  # really left-padded
    assert lm_perplexity(gpt2, row)["nll"] == pytest.approx(alone, rel=1e-5)
