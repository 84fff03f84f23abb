"""FuseLLM core: token alignment, top-k mapping, MinCE/AvgCE fusion and the sparse loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evoray.errors import EvorayError
from evoray.fusion import (
    FusionError,
    align_sequences,
    fuse_avg_ce,
    fuse_min_ce,
    fusellm_loss,
    fusion_loss,
    map_to_target,
    mean_ce,
    normalize_token,
    per_token_ce,
    topk_logits,
    vocab_map,
)

# ---------------------------------------------------------------- align


@pytest.mark.parametrize(
    ("tok", "want"),
    [
        ("Ġthe", "the"),
        ("▁the", "the"),
        ("the", "the"),
        ("##ing", "ing"),
        ("Ġ", ""),
        ("▁▁x", "x"),
        ("##", "##"),
        ("a##b", "a##b"),
    ],
)
def test_normalize_token(tok, want):
    assert normalize_token(tok) == want


def test_vocab_map_exact_normalised_and_edit_distance():
    src = {"Ġthe": 0, "cat": 1, "dgo": 2, "##ing": 3, "▁x": 4, "zzzz": 6}
    tgt = {"x": 7, "the": 0, "cats": 1, "dog": 2, "ing": 3, "Ġx": 4, "y": 5, "q": 6}
    out = vocab_map(src, tgt)
    assert out.dtype == np.int32 and out.shape == (7,)
    assert out[0] == 0  # normalised exact
    assert out[1] == 1  # edit distance 1
    assert out[2] == 2  # 'dgo' -> 'dog' (2) beats every 3-edit candidate
    assert out[3] == 3
    assert out[4] == 4  # normalised 'x' -> lowest id among 'Ġx'(4) and 'x'(7)
    assert out[5] == -1  # gap in source ids
    # 'zzzz' is 4 edits from 'cats','x','y','q' ... and 3 from 'the','dog','ing': lowest id wins
    assert out[6] == 0


def test_vocab_map_raw_match_preferred_and_ties_lowest_id():
    out = vocab_map({"Ġx": 0, "ab": 1}, {"x": 0, "Ġx": 1, "ac": 5, "bb": 3})
    assert out[0] == 1  # identical raw token first
    assert out[1] == 3  # 'ab' is 1 edit from both 'bb'(3) and 'ac'(5)


def test_vocab_map_a_few_thousand_tokens_runs():
    rng = np.random.default_rng(0)
    letters = list("abcdefghij")
    tgt = {"".join(rng.choice(letters, rng.integers(1, 7))): i for i in range(3000)}
    tgt = {t: i for i, t in enumerate(tgt)}
    src = {"Ġ" + "".join(rng.choice(letters, rng.integers(1, 7))): i for i in range(2000)}
    src = {t: i for i, t in enumerate(src)}
    src["a"] = len(src)
    tgt.setdefault("a", len(tgt))
    out = vocab_map(src, tgt)
    assert ((out >= 0) & (out < len(tgt))).all()


def test_vocab_map_errors():
    with pytest.raises(FusionError, match="source vocabulary is empty"):
        vocab_map({}, {"a": 0})
    with pytest.raises(FusionError, match="target vocabulary is empty"):
        vocab_map({"a": 0}, {})
    with pytest.raises(FusionError, match="cannot align: no source token matches"):
        vocab_map({"αβ": 0, "γ": 1}, {"ab": 0, "c": 1})
    assert issubclass(FusionError, EvorayError) and issubclass(FusionError, ValueError)


def test_align_char_level_vs_subword():
    src = list("helloworld")  # char-level tokenizer: spaces dropped
    tgt = ["hel", "lo", "Ġworld"]
    assert align_sequences(src, tgt) == [(2, 0), (4, 1), (9, 2)]
    # and the other way round: many target chars end one source token only at span ends
    assert align_sequences(tgt, src) == [(0, 2), (1, 4), (2, 9)]


def test_align_identical_and_mismatched_text():
    toks = ["▁the", "▁cat"]
    assert align_sequences(toks, ["Ġthe", "Ġcat"]) == [(0, 0), (1, 1)]
    # an unknown token in the source: edit-distance DP still aligns around it
    src = ["the", "[UNK]", "sat", "down"]
    tgt = ["the", "cat", "sat", "down"]
    pairs = align_sequences(src, tgt)
    assert (0, 0) in pairs and (2, 2) in pairs and (3, 3) in pairs
    assert pairs == sorted(pairs)
    assert len({j for _, j in pairs}) == len(pairs)


def test_align_errors():
    with pytest.raises(FusionError, match="source token sequence is empty"):
        align_sequences([], ["a"])
    with pytest.raises(FusionError, match="target token sequence is empty"):
        align_sequences(["a"], [])


# ---------------------------------------------------------------- distill


def test_topk_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, -1.0, 4.0, 0.0]], dtype=torch.float64)
    v, i = topk_logits(logits, k=2)
    assert v.dtype == torch.float32 and i.dtype == torch.int32
    assert i.tolist() == [[1, 3], [0, 2]]
    assert v.tolist() == [[3.0, 2.0], [5.0, 4.0]]
    with pytest.raises(FusionError, match="k must be in"):
        topk_logits(logits, k=5)
    with pytest.raises(FusionError, match=r"\[seq, vocab\]"):
        topk_logits(torch.zeros(3), k=1)


def test_per_token_ce_matches_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=g)
    labels = torch.tensor([1, 2, -100, 4, 5, 6])
    got = per_token_ce(logits, labels)
    want = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
    torch.testing.assert_close(got, want)
    valid = labels[1:] != -100
    assert mean_ce(logits, labels) == pytest.approx(float(want[valid].mean()), rel=1e-6)
    with pytest.raises(FusionError, match="labels shape"):
        per_token_ce(logits, labels[:3])


def _teacher(seq=5, vocab=13, k=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return topk_logits(torch.randn(seq, vocab, generator=g) * 2, k)


def _dense_reference(student, values, indices, valid, kind, t):
    p = torch.zeros_like(student)
    p.scatter_(-1, indices.long(), torch.softmax(values / t, -1))
    log_q = torch.log_softmax(student / t, -1)
    per = -(p * log_q).sum(-1)
    if kind == "kl":
        per = per + torch.xlogy(p, p).sum(-1)
    return per[valid].mean()


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_sparse_fusion_loss_equals_dense_reference(kind, t):
    values, indices = _teacher()
    student = torch.randn(5, 13, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([True, True, False, True, True])
    labels = torch.tensor([0, 1, 2, -100, 4])
    got = fusion_loss(student, values, indices, mask, kind=kind, temperature=t, labels=labels)
    valid = mask.clone()
    valid[:-1] &= labels[1:] != -100
    valid[-1] = False
    want = _dense_reference(student, values, indices, valid, kind, t)
    torch.testing.assert_close(got, want)
    no_labels = fusion_loss(student, values, indices, mask, kind=kind, temperature=t)
    torch.testing.assert_close(no_labels, _dense_reference(student, values, indices, mask, kind, t))


def test_kl_nonnegative_and_zero_for_matching_student():
    values, indices = _teacher()
    mask = torch.ones(5, dtype=torch.bool)
    student = torch.full((5, 13), -1e4)
    student.scatter_(-1, indices.long(), values)  # all student mass on the teacher's top-k
    assert float(fusion_loss(student, values, indices, mask, kind="kl")) == pytest.approx(
        0.0, abs=1e-5
    )
    for seed in range(3):
        s = torch.randn(5, 13, generator=torch.Generator().manual_seed(seed))
        assert float(fusion_loss(s, values, indices, mask, kind="kl")) >= 0.0


def test_map_to_target_merges_and_masks():
    values = torch.tensor([[2.0, 1.0, 0.0], [3.0, 2.0, 1.0]])
    indices = torch.tensor([[0, 1, 2], [2, 1, 0]], dtype=torch.int32)
    vmap = np.array([5, 5, 7], dtype=np.int32)  # source ids 0 and 1 both become target 5
    v, i, m = map_to_target(values, indices, vmap, [(0, 1), (1, 3)], tgt_len=4)
    assert m.tolist() == [False, True, False, True]
    assert torch.isinf(v[0]).all() and torch.isinf(v[2]).all()
    p = torch.softmax(values[0], -1)
    row = dict(zip(i[1].tolist(), v[1].exp().tolist(), strict=True))
    assert row[5] == pytest.approx(float(p[0] + p[1]), rel=1e-5)
    assert row[7] == pytest.approx(float(p[2]), rel=1e-5)
    assert float(v[1].exp().sum()) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(FusionError, match="beyond"):
        map_to_target(values, indices, vmap, [(2, 0)], tgt_len=4)
    with pytest.raises(FusionError, match="no target id"):
        map_to_target(values, indices, np.array([0, -1, 1]), [(0, 0)], tgt_len=1)


def _dist(probs_rows, ids_rows, mask):
    v = torch.tensor(probs_rows, dtype=torch.float32).log()
    return v, torch.tensor(ids_rows, dtype=torch.int32), torch.tensor(mask)


def test_fuse_min_ce_picks_lowest_ce():
    a = _dist([[0.5, 0.5]], [[0, 1]], [True])
    b = _dist([[0.9, 0.1]], [[2, 3]], [True])
    assert fuse_min_ce([a, b], [2.0, 1.0]) is b
    assert fuse_min_ce([a, b], [1.0, 1.0]) is a
    with pytest.raises(FusionError, match="2 source distributions but 1 CE"):
        fuse_min_ce([a, b], [1.0])
    with pytest.raises(FusionError, match="no source"):
        fuse_avg_ce([], [])


def test_fuse_avg_ce_weights_by_softmax_neg_ce():
    a = _dist([[0.5, 0.5], [0.5, 0.5]], [[0, 1], [0, 1]], [True, True])
    b = _dist([[0.75, 0.25], [1.0, 0.0]], [[1, 2], [3, 4]], [True, False])
    ce = [1.0, 2.0]
    wa, wb = torch.softmax(-torch.tensor(ce, dtype=torch.float64), 0).tolist()
    v, i, m = fuse_avg_ce([a, b], ce)
    assert m.tolist() == [True, True]
    row0 = {j: float(p) for j, p in zip(i[0].tolist(), v[0].exp().tolist(), strict=True) if p > 0}
    assert row0 == pytest.approx({0: 0.5 * wa, 1: 0.5 * wa + 0.75 * wb, 2: 0.25 * wb})
    row1 = {j: float(p) for j, p in zip(i[1].tolist(), v[1].exp().tolist(), strict=True) if p > 0}
    assert row1 == pytest.approx({0: 0.5, 1: 0.5})  # b absent: weights renormalised to a
    assert v.shape == (2, 4)


def test_fusellm_loss_lam_and_gradients():
    values, indices = _teacher()
    mask = torch.ones(5, dtype=torch.bool)
    labels = torch.tensor([3, 1, 4, 1, 5])
    student = torch.randn(5, 13, generator=torch.Generator().manual_seed(3), requires_grad=True)
    clm = F.cross_entropy(student[:-1], labels[1:])
    torch.testing.assert_close(fusellm_loss(student, labels, values, indices, mask, lam=1.0), clm)
    fus = fusion_loss(student, values, indices, mask, labels=labels)
    loss = fusellm_loss(student, labels, values, indices, mask, lam=0.9)
    torch.testing.assert_close(loss, 0.9 * clm + 0.1 * fus)
    (g,) = torch.autograd.grad(
        fusellm_loss(student, labels, values, indices, mask, lam=0.0), student
    )
    assert g.abs().sum() > 0 and torch.isfinite(g).all()


def test_loss_errors():
    values, indices = _teacher()
    student = torch.zeros(5, 13)
    mask = torch.ones(5, dtype=torch.bool)
    with pytest.raises(FusionError, match="kind must be"):
        fusion_loss(student, values, indices, mask, kind="mse")
    with pytest.raises(FusionError, match="must both be"):
        fusion_loss(student, values[:3], indices[:3], mask)
    with pytest.raises(FusionError, match="mask shape"):
        fusion_loss(student, values, indices, mask[:2])
    with pytest.raises(FusionError, match="temperature"):
        fusion_loss(student, values, indices, mask, temperature=0)
    with pytest.raises(FusionError, match="lam must be"):
        fusellm_loss(student, torch.zeros(5, dtype=torch.long), values, indices, mask, lam=1.5)
    with pytest.raises(FusionError, match="all shifted labels"):
        fusellm_loss(student, torch.full((5,), -100), values, indices, mask)
    empty = fusion_loss(student, values, indices, torch.zeros(5, dtype=torch.bool))
    assert float(empty) == 0.0


# ---------------------------------------------------------------- end to end

SENTENCES = [
    "the cat and the dog run",
    "a small bird can fly",
    "the old dog was not fast",
    "a red fish is in the river",
]


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = sorted({c for s in SENTENCES for c in s if c != " "})
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    # spaces are out of vocab: they become [UNK] tokens, which alignment must skip over
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return tok


def _bpe_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"], show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer=trainer)
    return tok


def _target_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.factories import VOCAB

    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_end_to_end_two_sources_one_step_reduces_loss():
    from transformers import LlamaForCausalLM

    from tests.factories import tiny_config

    text = SENTENCES[0]
    tgt_tok = _target_tokenizer()
    tgt_enc = tgt_tok.encode(text)
    assert "[UNK]" not in tgt_enc.tokens
    tgt_ids = torch.tensor(tgt_enc.ids)

    dists, ces = [], []
    for seed, src_tok in enumerate([_char_tokenizer(), _bpe_tokenizer()]):
        enc = src_tok.encode(text)
        assert len(enc.tokens) > 1 and enc.tokens != tgt_enc.tokens
        torch.manual_seed(seed)
        source = LlamaForCausalLM(tiny_config(vocab_size=src_tok.get_vocab_size())).eval()
        ids = torch.tensor(enc.ids)
        with torch.no_grad():
            logits = source(input_ids=ids[None]).logits[0]
        ces.append(mean_ce(logits, ids))
        values, indices = topk_logits(logits, k=5)
        vmap = vocab_map(src_tok.get_vocab(), tgt_tok.get_vocab())
        pairs = align_sequences(enc.tokens, tgt_enc.tokens)
        assert [j for _, j in pairs] == list(range(len(tgt_enc.tokens)))  # every word end
        dists.append(map_to_target(values, indices, vmap, pairs, tgt_len=len(tgt_ids)))

    fused_v, fused_i, mask = fuse_avg_ce(dists, ces)
    assert mask.all()
    torch.manual_seed(7)
    target = LlamaForCausalLM(tiny_config())
    opt = torch.optim.SGD(target.parameters(), lr=0.5)

    def loss_fn():
        logits = target(input_ids=tgt_ids[None]).logits[0]
        return fusellm_loss(logits, tgt_ids, fused_v, fused_i, mask, lam=0.9)

    before = loss_fn()
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after = loss_fn()
    assert float(after) < float(before.detach())
    assert fuse_min_ce(dists, ces) is dists[int(np.argmin(ces))]


def test_fuse_avg_ce_uncovered_position_stays_masked():
    a = _dist([[0.5, 0.5], [0.5, 0.5]], [[0, 1], [0, 1]], [True, False])
    a = (a[0].masked_fill(~a[2][:, None], float("-inf")), a[1], a[2])
    v, i, m = fuse_avg_ce([a, a], [0.5, 3.0])
    assert m.tolist() == [True, False]
    assert torch.isinf(v[1]).all() and not torch.isnan(v).any()
    student = torch.zeros(2, 4, requires_grad=True)
    loss = fusion_loss(student, v, i, m, kind="kl")
    loss.backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("kind", ["ce", "kl"])
@pytest.mark.parametrize("lam", [0.0, 0.9, 1.0])
def test_batched_loss_equals_per_sequence_loop(kind, lam):
    """One padded pass == mean of per-sequence ``fusellm_loss`` (values and gradients),
    with ragged lengths, ragged teacher k and unaligned positions."""
    from evoray.fusion.distill import fusellm_loss_batch, pad_teachers

    g = torch.Generator().manual_seed(0)
    lengths, ks, vocab = [7, 4, 6], [3, 5, 2], 11
    width = max(lengths)
    logits = torch.randn(len(lengths), width, vocab, generator=g, requires_grad=True)
    ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    labels = ids.clone()
    teachers = []
    for b, (n, k) in enumerate(zip(lengths, ks, strict=True)):
        labels[b, n:] = -100
        v = torch.randn(n, k, generator=g)
        v[0, -1] = float("-inf")  # an empty slot
        ix = torch.randint(0, vocab, (n, k), generator=g, dtype=torch.int32)
        m = torch.rand(n, generator=g) > 0.3
        m[1] = True
        teachers.append((v, ix, m))
    loop = torch.stack(
        [
            fusellm_loss(logits[b, :n], ids[b, :n], *teachers[b], lam, kind, 1.5)
            for b, n in enumerate(lengths)
        ]
    ).mean()
    (grad_loop,) = torch.autograd.grad(loop, logits)
    batch = fusellm_loss_batch(
        logits, labels, *pad_teachers(teachers, width), lam=lam, kind=kind, temperature=1.5
    )
    (grad_batch,) = torch.autograd.grad(batch, logits)
    torch.testing.assert_close(batch, loop)
    torch.testing.assert_close(grad_batch, grad_loop)
    assert torch.isfinite(grad_batch).all()


def test_batched_loss_rejects_bad_input():
    from evoray.fusion.distill import fusellm_loss_batch

    logits = torch.zeros(2, 3, 5)
    labels = torch.tensor([[1, 2, 3], [1, -100, -100]])
    with pytest.raises(FusionError, match="all shifted labels -100"):
        fusellm_loss_batch(logits, labels, None, None, None, lam=1.0)
    with pytest.raises(FusionError, match="needs fused teacher"):
        fusellm_loss_batch(logits, torch.tensor([[1, 2, 3], [1, 2, -100]]), None, None, None)
    with pytest.raises(FusionError, match=r"\[B, T, V\]"):
        fusellm_loss_batch(logits[0], labels[0], None, None, None, lam=1.0)


def test_vocab_map_word_start_and_space_tokens():
    src = {"▁cat": 0, "cat": 1, " ": 2, "▁": 3}
    tgt = {"cat": 0, "▁cat": 1, "▁": 2, "x": 3}
    out = vocab_map({"Ġcat": 0, "cat": 1, " ": 2}, tgt)
    assert list(out) == [1, 0, 2]  # 'Ġcat' -> '▁cat' (word start kept); ' ' -> bare marker
    assert list(vocab_map(src, tgt)) == [1, 0, 2, 2]


def test_vocab_map_prefix_fallback_picks_what_the_target_emits_first():
    tgt = {"ouse": 0, "▁h": 1, "▁ho": 2, "▁s": 3, "ho": 4, "zz": 5}
    src = {"▁house": 0, "house": 1, "▁zz": 2}
    edit = vocab_map(src, tgt)
    assert edit[0] == 0 and edit[1] == 0  # 'house' is 1 edit from 'ouse'
    prefix = vocab_map(src, tgt, fallback="prefix")
    assert prefix[0] == 2  # longest word-start prefix '▁ho', not '▁h' or mid-word 'ho'
    assert prefix[1] == 4  # mid-word 'house' -> mid-word 'ho'
    assert prefix[2] == 5  # same text, other word-start status, before any prefix
    with pytest.raises(FusionError, match="fallback must be one of"):
        vocab_map(src, tgt, fallback="nearest")


def test_keep_same_next_uses_a_source_only_where_next_tokens_agree():
    """A finer source ('▁c at') against a target that emits '▁cat': token ends align at
    '<s>', '▁the', 'cat' and '</s>', but the source's distribution is kept only where its next
    token maps to the target's next token (FuseLLM's condition)."""
    from evoray.fusion.align import keep_same_next

    src = ["<s>", "▁the", "▁c", "at", "</s>"]
    tgt = ["<s>", "▁the", "▁cat", "</s>"]
    src_vocab = {t: i for i, t in enumerate(src)}
    tgt_vocab = {t: i for i, t in enumerate([*tgt, "▁c"])}  # the target also knows '▁c'
    vmap = vocab_map(src_vocab, tgt_vocab)
    src_ids = [src_vocab[t] for t in src]
    tgt_ids = [tgt_vocab[t] for t in tgt]
    pairs = align_sequences(src, tgt)
    assert pairs == [(0, 0), (1, 1), (3, 2), (4, 3)]
    kept = keep_same_next(pairs, src_ids, tgt_ids, vmap)
    # after '<s>' both emit '▁the'; after '▁the' the source emits '▁c', the target '▁cat';
    # after 'cat' both emit '</s>'; the last pair has no next token
    assert kept == [(0, 0), (3, 2)]


def test_per_char_ce_is_the_text_nll_per_character():
    from evoray.fusion.teacher_build import per_char_ce

    # a char model (7 tokens incl. eos) and a word model (3 tokens) with the same total NLL
    # score the same per character, though their per-token means differ by 7/3
    char_ce, word_ce = np.full(7, 0.5), np.full(3, 3.5 / 3)
    assert per_char_ce(char_ce, "ab cdef") == pytest.approx(3.5 / 8)
    assert per_char_ce(word_ce, "ab cdef") == pytest.approx(per_char_ce(char_ce, "ab cdef"))
    assert char_ce.mean() < word_ce.mean()
