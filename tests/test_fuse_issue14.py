"""Issue 14 and the fusion items of issue 13: safe source names, fresh builds, missing
tokenizers, fuse-only hints, alignment quality, pad-less targets, short texts, domain demo,
FSDP through Ray Train."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from evoray.errors import CheckpointError, ConfigError
from evoray.fusion import FusionError
from evoray.fusion.corpus import (
    build_bpe_tokenizer,
    build_char_tokenizer,
    make_corpus,
    make_tiny_lm,
    mixed_corpus,
)
from evoray.fusion.fuse_config import FuseConfig
from evoray.fusion.sources import extract_all, load_lm
from evoray.fusion.teacher_build import build_teachers
from evoray.fusion.train import clm_train, fuse_train, heldout_perplexity

BASE = {"sources": [{"name": "a", "tokenizer": "char"}, {"name": "b", "vocab_size": 90}]}


def _save(tok, model, path: Path) -> Path:
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(seed=0, n_train=16, n_heldout=6)


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus):
    train, _ = corpus
    root = tmp_path_factory.mktemp("fuse14")
    char, bpe = build_char_tokenizer(train), build_bpe_tokenizer(train, 90)
    tgt = build_bpe_tokenizer(train, 60)
    sources = [
        _save(char, make_tiny_lm(char, seed=1, hidden=16), root / "char"),
        _save(bpe, make_tiny_lm(bpe, seed=2, hidden=16), root / "bpe"),
    ]
    return sources, _save(tgt, make_tiny_lm(tgt, seed=0, hidden=16), root / "target")


@pytest.mark.parametrize("name", ["../../../x", "a/b", "/tmp/abs", "", " ", "..", "a\\b", "C:x"])
def test_source_names_that_are_not_plain_folder_names_are_refused(name):
    """A name becomes output_dir/sources/<name>: '../../../x' would write outside it."""
    raw = {"build": True, "sources": [{"name": name, "tokenizer": "char"}]}
    with pytest.raises(ConfigError, match=r"sources\[0\]\.name: .* is not a plain folder name"):
        FuseConfig.from_dict(raw, source="f.yaml")
    FuseConfig.from_dict({"sources": [{"name": "ok-name_1.v2"}]})  # plain names still parse


def test_building_into_an_existing_folder_leaves_no_old_file(tmp_path, corpus):
    from evoray.fusion.fuse_cli import build_model

    spec = FuseConfig.from_dict(BASE).sources[0]
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"stale")
    (folder / "vocab.json").write_text("{}")
    (folder / "notes").mkdir()
    build_model(spec, corpus[0], folder)
    names = {p.name for p in folder.iterdir()}
    assert "pytorch_model.bin" not in names and "notes" not in names
    assert "vocab.json" not in names  # a char tokenizer writes tokenizer.json only
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= names


def test_a_source_folder_without_tokenizer_is_a_clear_error(tmp_path, corpus, models):
    from evoray.fusion.fuse_cli import run_fuse

    sources, target = models
    bare = tmp_path / "bare"
    model, _ = load_lm(sources[1])
    model.save_pretrained(str(bare), safe_serialization=True)  # weights + config, no tokenizer
    with pytest.raises(FusionError, match=rf"model folder {re.escape(str(bare))} has no tokenizer"):
        load_lm(bare)
    cfg = FuseConfig.from_dict(
        {"build": False, "sources": [{"name": "s", "path": str(bare)}],
         "target": {"path": str(target)}, "output_dir": str(tmp_path / "out")}
    )  # fmt: skip
    with pytest.raises(FusionError, match=r"has no tokenizer.*tokenizer\.save_pretrained"):
        run_fuse(cfg, report=lambda _m: None)
    assert not (tmp_path / "out").exists()  # refused before any work


def _fuse_flags() -> set[str]:
    from evoray.fusion.fuse_cli import add_fuse_parser

    sub = argparse.ArgumentParser().add_subparsers()
    parser = add_fuse_parser(sub)
    return {s for a in parser._actions for s in a.option_strings}


def test_checkpoint_hints_in_the_fuse_path_name_only_fuse_options(tmp_path, models):
    """A pickle-only source: the checkpoint module suggests --allow-pickle, which `evoray fuse`
    does not have; the message must name only options the command has."""
    sources, _ = models
    model, tok = load_lm(sources[1])
    pkl = tmp_path / "pickled"
    model.save_pretrained(str(pkl), safe_serialization=False)
    tok.save_pretrained(str(pkl))
    for f in pkl.glob("*.safetensors"):
        f.unlink()
    if not list(pkl.glob("*.bin")):
        torch.save(model.state_dict(), pkl / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_lm(pkl)
    message = str(err.value)
    assert "pickle" in message and "safe_serialization=True" in message
    assert set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", message)) <= _fuse_flags(), message
    assert "pass --allow-pickle" not in message


def test_alignment_quality_is_reported_and_a_poor_pairing_warns(tmp_path, corpus, models):
    from evoray.fusion.align import vocab_match_shares

    shares = vocab_match_shares({"▁cat": 0, "Ġdog": 1, "zz": 2}, {"cat": 0, "▁dog": 1, "x": 2})
    assert shares == {"vocab_exact_share": 2 / 3, "target_vocab_share": 2 / 3}
    sources, target = models
    train = corpus[0][:8]
    dists = extract_all(sources, train, tmp_path / "d", k=4, use_ray=False)
    lines: list[str] = []
    stats: dict = {}
    build_teachers(target, sources, train, dists, tmp_path / "t", report=lines.append,
                   stats=stats, min_vocab_share=0.0)  # fmt: skip
    quality = [line for line in lines if "alignment, source" in line]
    assert len(quality) == 2 and not any("warning" in line for line in lines)
    q = stats["sources"]
    assert all(0 < s["aligned_share"] <= 1 and 0 <= s["kept_share"] <= 1 for s in q)
    assert q[0]["vocab_exact_share"] == 1.0  # characters all exist in the target's BPE
    assert q[0]["target_vocab_share"] < q[1]["target_vocab_share"]  # chars cover less
    assert f"{q[0]['aligned_share']:.1%} of target positions aligned" in quality[0]
    lines.clear()
    threshold = (q[0]["target_vocab_share"] + q[1]["target_vocab_share"]) / 2
    build_teachers(target, sources, train, dists, tmp_path / "t", report=lines.append,
                   min_vocab_share=threshold)  # fmt: skip
    warned = [line for line in lines if line.startswith("warning")]
    assert len(warned) == 1 and "source 0" in warned[0]
    assert f"{q[0]['target_vocab_share']:.1%}" in warned[0]
    assert FuseConfig.from_dict(BASE).fusion.min_vocab_share == 0.2  # the documented default
    with pytest.raises(ConfigError, match=r"fusion\.min_vocab_share must be in"):
        FuseConfig.from_dict({**BASE, "fusion": {"min_vocab_share": 2}})


def test_a_target_without_pad_token_trains_and_scores(tmp_path, corpus, models):
    sources, _ = models
    train, heldout = corpus
    tok = build_bpe_tokenizer(train, 60)
    tok.pad_token = None
    assert tok.pad_token_id is None
    target = _save(tok, make_tiny_lm(tok, seed=0, hidden=16), tmp_path / "nopad")
    clm = clm_train(target, train, steps=2, batch_size=4, out_dir=tmp_path / "clm")
    fused = fuse_train(target, sources, train, steps=2, batch_size=4, k=4,
                       out_dir=tmp_path / "fused")  # fmt: skip
    assert np.isfinite(clm["losses"]).all() and np.isfinite(fused["losses"]).all()
    assert np.isfinite(heldout_perplexity(tmp_path / "fused", heldout))


def test_texts_shorter_than_two_tokens_are_skipped_with_a_count(tmp_path, models):
    from evoray.fusion.batches import drop_short_texts

    _, target = models
    tok = load_lm(target)[1]
    texts = ["the cat sleeps in the house .", "", " ", "a", "the dog runs ."]
    kept, dropped = drop_short_texts(tok, texts)
    assert kept == ["the cat sleeps in the house .", "the dog runs ."] and dropped == 3
    with pytest.raises(FusionError, match="all 2 training texts are shorter than two tokens"):
        drop_short_texts(tok, ["", "a"])


def test_run_fuse_reports_skipped_short_texts(tmp_path, capsys):
    from evoray.fusion.fuse_cli import run_fuse

    train, heldout = make_corpus(seed=0, n_train=12, n_heldout=4)
    (tmp_path / "train.txt").write_text("\n".join([*train, "a", "."]) + "\n")
    (tmp_path / "held.txt").write_text("\n".join(heldout) + "\n")
    cfg = FuseConfig.from_dict(
        {"corpus": {"train": str(tmp_path / "train.txt"), "heldout": str(tmp_path / "held.txt")},
         "sources": [{"name": "c", "tokenizer": "char", "hidden": 16, "steps": 1}],
         "target": {"hidden": 16, "vocab_size": 60, "steps": 0},
         "fusion": {"steps": 1, "batch_size": 2, "k": 4}, "output_dir": str(tmp_path / "o")}
    )  # fmt: skip
    lines: list[str] = []
    run_fuse(cfg, report=lines.append)
    assert any("skipped 2 of 14 training texts shorter than two tokens" in x for x in lines)


def test_domain_sources_learn_their_own_text_never_the_held_out(tmp_path):
    from evoray.fusion.fuse_cli import build_texts

    cfg = FuseConfig.from_yaml("search_spaces/fusellm_domains.yaml")
    assert cfg.corpus.domains == ("animals", "kitchen", "places")
    from evoray.fusion.corpus import load_corpus

    train, heldout = load_corpus(cfg.corpus)
    assert len(train) == 90 and len(heldout) == 3 * 40 and not set(train) & set(heldout)
    _, by_domain = mixed_corpus(list(cfg.corpus.domains), 0, 90, 40)
    for spec in cfg.sources:
        own = build_texts(spec, train, heldout)
        assert len(own) == spec.texts > len(train) and not set(own) & set(heldout)
        assert len(set(own) & set(by_domain[spec.domain])) == 0
    with pytest.raises(ConfigError, match=r"corpus\.domains"):
        FuseConfig.from_dict({**BASE, "corpus": {"domains": ["space"]}})
    with pytest.raises(ConfigError, match=r"sources\[0\]\.domain must be one of"):
        FuseConfig.from_dict({"sources": [{"name": "a", "domain": "space"}]})
    with pytest.raises(ConfigError, match=r"resources\.data_parallel must be one of"):
        FuseConfig.from_dict({**BASE, "resources": {"data_parallel": "zero3"}})


def test_avg_ce_min_weight_drops_positions_the_best_source_misses():
    from evoray.fusion.distill import fuse_avg_ce

    v = torch.zeros(3, 2)
    i = torch.tensor([[0, 1]] * 3, dtype=torch.int32)
    good = (v, i, torch.tensor([True, False, True]))
    bad = (v, i, torch.tensor([True, True, False]))
    ce = [0.1, 5.0]  # the first source knows this text, the second does not
    assert fuse_avg_ce([good, bad], ce)[2].tolist() == [True, True, True]
    assert fuse_avg_ce([good, bad], ce, min_weight=0.5)[2].tolist() == [True, False, True]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_fsdp_with_activation_checkpointing_equals_one_process(tmp_path, corpus, models,
                                                                ray_local):  # fmt: skip
    """Two FSDP2 ranks (Ray Train, gloo on CPU), parameters and AdamW state sharded, with
    activation checkpointing: the same losses and weights as one plain process; each rank
    holds about half of the parameters and optimizer state."""
    from evoray.fusion.remote import run_data_parallel

    sources, target = models
    train = corpus[0][:8]
    dists = extract_all(sources, train, tmp_path / "d", k=4, use_ray=False)
    store = build_teachers(target, sources, train, dists, tmp_path / "teachers")
    job = {"target_path": target, "source_paths": sources, "texts": train, "teachers": store,
           "lam": 0.5, "steps": 3, "lr": 1e-2, "batch_size": 4}  # fmt: skip
    one = fuse_train(**job, out_dir=tmp_path / "one", device="cpu")
    two = run_data_parallel(
        (fuse_train, {**job, "out_dir": tmp_path / "two", "data_parallel": "fsdp",
                      "activation_checkpointing": True}),
        workers=2,
        num_cpus=1,
        storage_path=tmp_path / "ray_train",
    )  # fmt: skip
    assert two["world_size"] == 2
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    wa, wb = _weights(one["out_dir"]), _weights(two["out_dir"])
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    full = one["memory"][0]
    for rank in two["memory"]:
        assert rank["param_bytes"] < 0.6 * full["param_bytes"]
        assert rank["optimizer_bytes"] < 0.6 * full["optimizer_bytes"]


def test_length_batches_bound_padding_and_padded_extraction_equals_unpadded(corpus):
    from evoray.fusion.sources import length_batches, source_distributions

    lengths = [5, 9, 6, 5, 30, 8, 7, 6, 10, 5]
    for max_pad in (0.0, 0.2, 0.5):
        batches = length_batches(lengths, 4, max_pad)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            width = max(lengths[i] for i in b)
            pad = width * len(b) - sum(lengths[i] for i in b)
            assert len(b) <= 4 and pad <= max_pad * width * len(b)
    assert all(len({lengths[i] for i in b}) == 1 for b in length_batches(lengths, 4, 0.0))
    assert len(length_batches(lengths, 4, 0.5)) < len(length_batches(lengths, 4, 0.0))
    train, _ = corpus
    tok = build_char_tokenizer(train)
    model = make_tiny_lm(tok, seed=0, hidden=16)
    texts = train[:8]
    exact = source_distributions(model, tok, texts, k=4, max_pad=0.0)
    padded = source_distributions(model, tok, texts, k=4, batch_size=8, max_pad=1.0)
    for a, b in zip(exact, padded, strict=True):
        np.testing.assert_allclose(b["values"], a["values"], atol=1e-5)
        np.testing.assert_allclose(b["ce"], a["ce"], atol=1e-5)
