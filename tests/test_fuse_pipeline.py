"""FuseLLM end to end on tiny offline models: shards, Ray extraction, training, CLI, errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from evoray.errors import EvorayError
from evoray.fusion import FusionError
from evoray.fusion.corpus import (
    build_bpe_tokenizer,
    build_char_tokenizer,
    make_corpus,
    make_tiny_lm,
)
from evoray.fusion.sources import (
    SHARD_NAME,
    SourceWorker,
    encode_ids,
    extract_all,
    read_shards,
    shard_name,
    source_distributions,
    write_shard,
)
from evoray.fusion.teacher_build import build_teachers, checked_vocab_map
from evoray.fusion.train import clm_train, fuse_train, heldout_perplexity


def _save(tok, model, path: Path) -> Path:
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(seed=0, n_train=24, n_heldout=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus):
    """Two sources (char-level, BPE 90) and a target (BPE 60), all untrained, hidden 16."""
    train, _ = corpus
    root = tmp_path_factory.mktemp("fuse_models")
    char, bpe = build_char_tokenizer(train), build_bpe_tokenizer(train, 90)
    tgt = build_bpe_tokenizer(train, 60)
    sources = [
        _save(char, make_tiny_lm(char, seed=1, hidden=16), root / "char"),
        _save(bpe, make_tiny_lm(bpe, seed=2, hidden=16), root / "bpe"),
    ]
    return sources, _save(tgt, make_tiny_lm(tgt, seed=0, hidden=16), root / "target")


def test_corpus_is_deterministic_and_disjoint():
    a, b = make_corpus(3, 50, 10), make_corpus(3, 50, 10)
    assert a == b and len(a[0]) == 50 and len(a[1]) == 10
    assert not set(a[1]) & set(a[0])


def test_shards_round_trip_without_padding(tmp_path, corpus):
    train, _ = corpus
    tok = build_char_tokenizer(train)
    model = make_tiny_lm(tok, seed=0, hidden=16)
    texts = train[:6]
    rows = source_distributions(model, tok, texts, k=4, batch_size=3)
    lengths = [len(r["tokens"]) for r in rows]
    assert len(set(lengths)) > 1  # sequences of different lengths, none padded
    for r, t in zip(rows, texts, strict=True):
        assert r["text"] == t and r["tokens"][0] == "<s>" and r["tokens"][-1] == "</s>"
        assert len(r["tokens"]) == len(encode_ids(tok, t))
        assert r["values"].shape == r["indices"].shape == (len(r["tokens"]), 4)
        assert r["ce"].shape == (len(r["tokens"]) - 1,)
    # batched (equal lengths) equals one sequence at a time
    single = source_distributions(model, tok, texts[:1], k=4)[0]
    np.testing.assert_allclose(single["values"], rows[0]["values"], atol=1e-5)
    path = write_shard(rows, tmp_path / "d" / SHARD_NAME)
    assert [p.name for p in path.parent.iterdir()] == [SHARD_NAME]  # no temp file left
    schema = pq.read_schema(path)
    assert str(schema.field("indices").type) == "list<element: int32>"
    assert str(schema.field("values").type) == "list<element: float>"
    back = read_shards(path.parent)
    assert len(back) == len(rows)
    for r, b in zip(rows, back, strict=True):
        assert b["indices"].dtype == np.int32 and b["values"].dtype == np.float32
        np.testing.assert_array_equal(r["indices"], b["indices"])
        np.testing.assert_array_equal(r["values"], b["values"])
        np.testing.assert_array_equal(r["ce"], b["ce"])
        assert b["tokens"] == r["tokens"] and b["mean_ce"] == pytest.approx(r["mean_ce"])


def test_extract_in_process_equals_ray(tmp_path, corpus, models, ray_local):
    """One shard here == three shards written by two actors per source on Ray."""
    sources, _ = models
    texts = corpus[0][:10]
    local = extract_all(sources, texts, tmp_path / "local", k=5, use_ray=False)
    lines: list[str] = []
    remote = extract_all(
        sources,
        texts,
        tmp_path / "ray",
        k=5,
        use_ray=True,
        num_cpus=0.5,
        shard_size=4,
        workers_per_source=2,
        report=lines.append,
    )
    assert [d.name for d in remote] == ["source_0", "source_1"]
    assert len(lines) == 6 and any("source 1: shard-00002.parquet (2 texts)" in x for x in lines)
    for a, b in zip(local, remote, strict=True):
        assert sorted(p.name for p in b.iterdir()) == [shard_name(i) for i in range(3)]
        ra, rb = read_shards(a), read_shards(b)
        assert [r["text"] for r in rb] == texts
        assert [r["tokens"] for r in ra] == [r["tokens"] for r in rb]
        for x, y in zip(ra, rb, strict=True):
            np.testing.assert_array_equal(x["indices"], y["indices"])
            np.testing.assert_allclose(x["values"], y["values"], atol=1e-5)


def test_extraction_resumes_from_finished_shards(tmp_path, corpus, models, monkeypatch):
    """A crash leaves whole shards; the rerun computes only the missing ones, and a shorter
    corpus drops the stale tail."""
    sources, _ = models
    texts = corpus[0][:9]
    first = extract_all(sources[:1], texts, tmp_path, k=3, use_ray=False, shard_size=4)
    want = read_shards(first[0])
    (first[0] / shard_name(1)).unlink()  # the crash hit while shard 1 was being written
    calls: list[str] = []
    original = SourceWorker.run

    def counting(self, chunk, out_path):
        calls.append(Path(out_path).name)
        return original(self, chunk, out_path)

    monkeypatch.setattr(SourceWorker, "run", counting)
    again = extract_all(sources[:1], texts, tmp_path, k=3, use_ray=False, shard_size=4)
    assert calls == [shard_name(1)]
    got = read_shards(again[0])
    assert [r["text"] for r in got] == texts
    for x, y in zip(want, got, strict=True):
        np.testing.assert_array_equal(x["indices"], y["indices"])
    calls.clear()
    extract_all(sources[:1], texts[:4], tmp_path, k=3, use_ray=False, shard_size=4)
    assert calls == []  # shard 0 holds exactly these texts
    assert [r["text"] for r in read_shards(again[0])] == texts[:4]
    extract_all(sources[:1], texts[1:5], tmp_path, k=3, use_ray=False, shard_size=4)
    assert calls == [shard_name(0)]  # other texts: recomputed, not trusted


@pytest.mark.parametrize("method", ["avg_ce", "min_ce"])
def test_fuse_train_lowers_loss_and_saves_loadable_model(tmp_path, corpus, models, method):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sources, target = models
    train, heldout = corpus
    res = fuse_train(
        target, sources, train, method=method, steps=6, lr=1e-2, k=5, out_dir=tmp_path / "fused"
    )
    assert res["loss_after"] < res["loss_before"]
    assert len(res["losses"]) == 6
    assert (tmp_path / "fused" / "model.safetensors").is_file()
    assert (tmp_path / "fused" / "distributions" / "source_1" / SHARD_NAME).is_file()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "fused"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "fused"))
    assert model.config.vocab_size == len(tok)
    before = heldout_perplexity(target, heldout)
    assert heldout_perplexity(tmp_path / "fused", heldout) < before
    # the fusion term is really there: the same steps of plain CLM give another model
    clm = clm_train(target, train, steps=6, lr=1e-2, out_dir=tmp_path / "clm")
    fused_w = model.lm_head.weight
    clm_w = AutoModelForCausalLM.from_pretrained(str(clm["out_dir"])).lm_head.weight
    assert not torch.allclose(fused_w, clm_w)


def test_cli_prints_three_perplexities(tmp_path, capsys):
    """`evoray fuse` on the user's own corpus files (jsonl train, txt held-out)."""
    import json

    from evoray.fusion.fuse_cli import add_fuse_parser

    train, heldout = make_corpus(seed=1, n_train=16, n_heldout=4)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in train))
    (tmp_path / "heldout.txt").write_text("\n".join(heldout) + "\n\n")
    cfg = tmp_path / "fuse.yaml"
    cfg.write_text(
        f"corpus: {{train: {tmp_path / 'train.jsonl'}, heldout: {tmp_path / 'heldout.txt'}, "
        "text_field: body}\n"
        "sources:\n"
        "  - {name: char, tokenizer: char, hidden: 16, steps: 2}\n"
        "  - {name: bpe70, tokenizer: bpe, vocab_size: 70, hidden: 16, steps: 2}\n"
        "target: {tokenizer: bpe, vocab_size: 50, hidden: 16, steps: 1}\n"
        "fusion: {method: min_ce, k: 4, steps: 2, batch_size: 4}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    parser = argparse.ArgumentParser()
    add_fuse_parser(parser.add_subparsers())
    args = parser.parse_args(["fuse", str(cfg), "--json", str(tmp_path / "r.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for label in (
        "target before training",
        "target after CLM",
        "target after FuseLLM",
        "source char",
        "target_clm: step 2/2, loss",  # progress of both trainings
        "target_fused: step 2/2, loss",
    ):
        assert label in out
    assert (tmp_path / "run" / "target_fused" / "model.safetensors").is_file()
    assert "target_fused" in (tmp_path / "r.json").read_text()


def test_errors_empty_corpus(tmp_path, models):
    sources, target = models
    for call in (
        lambda: fuse_train(target, sources, [], steps=1, out_dir=tmp_path / "a"),
        lambda: clm_train(target, [], steps=1, out_dir=tmp_path / "b"),
        lambda: extract_all(sources, [], tmp_path / "c", use_ray=False),
    ):
        with pytest.raises(FusionError, match=r"empty|no texts"):
            call()


def test_errors_unalignable_tokenizers(tmp_path, corpus, models):
    _, target = models
    greek = build_char_tokenizer(["αβγ δεζ ηθ"])
    src = _save(greek, make_tiny_lm(greek, seed=0, hidden=16), tmp_path / "greek")
    from transformers import AutoTokenizer

    with pytest.raises(FusionError, match="share no token"):
        checked_vocab_map(greek, AutoTokenizer.from_pretrained(str(target)))
    with pytest.raises(FusionError, match="cannot align source 0"):
        fuse_train(target, [src], corpus[0][:4], steps=1, k=3, out_dir=tmp_path / "o")


def test_errors_missing_special_tokens(corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, "the": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]")
    with pytest.raises(FusionError, match="no bos token") as info:
        encode_ids(tok, "the the")
    assert isinstance(info.value, EvorayError)
    with pytest.raises(FusionError, match="bos"):
        source_distributions(torch.nn.Linear(1, 1), tok, ["the"], k=1)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def test_training_as_ray_tasks_equals_in_process(tmp_path, corpus, models, ray_local):
    """Both trainings as Ray tasks (one CPU each, run at once) give the same weights as
    running them here; errors inside a task come back as the same FusionError."""
    from evoray.fusion.remote import run_jobs

    sources, target = models
    train = corpus[0][:12]
    dists = extract_all(sources, train, tmp_path / "d", k=4, use_ray=False)
    common = {"target_path": target, "texts": train, "steps": 3, "lr": 1e-2, "batch_size": 4}
    fused = {**common, "source_paths": sources, "dist_dirs": dists, "k": 4, "lam": 0.5}

    def jobs(tag: str):
        return [
            (clm_train, {**common, "out_dir": tmp_path / tag / "clm"}),
            (fuse_train, {**fused, "out_dir": tmp_path / tag / "fused"}),
        ]

    here = run_jobs(jobs("here"), use_ray=False)
    remote = run_jobs(jobs("ray"), use_ray=True, num_cpus=1)
    assert [r["device"] for r in remote] == ["cpu", "cpu"]
    assert all(r["gpu_ids"] == [] and r["node_id"] for r in remote)
    for a, b in zip(here, remote, strict=True):
        assert a["losses"] == b["losses"]
        wa, wb = _weights(a["out_dir"]), _weights(b["out_dir"])
        assert wa.keys() == wb.keys()
        for name in wa:
            torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=0)
    with pytest.raises(FusionError, match="corpus is empty"):
        run_jobs([(clm_train, {**common, "texts": [], "out_dir": tmp_path / "e"})], use_ray=True)
    with pytest.raises(FusionError, match=r"gpus=1 but the Ray cluster has 0"):
        run_jobs(jobs("gpu"), use_ray=True, num_gpus=1)
    with pytest.raises(FusionError, match=r"gpus=1 but the Ray cluster has 0"):
        extract_all(sources, train, tmp_path / "g", k=4, use_ray=True, num_gpus=1)


_FAKE_GPU_SCRIPT = """
import sys, ray
from evoray.fusion import FusionError
from evoray.fusion.remote import run_jobs
from evoray.fusion.train import clm_train
ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
target, out = sys.argv[1], sys.argv[2]
job = {"target_path": target, "texts": ["the cat ."] * 4, "steps": 1, "batch_size": 2}
try:
    run_jobs([(clm_train, {**job, "out_dir": out + "/a"})], use_ray=True, num_gpus=1)
except FusionError as exc:
    print("REFUSED:", exc)
res = run_jobs([(clm_train, {**job, "out_dir": out + "/b", "device": "cpu"})],
               use_ray=True, num_gpus=1)
print("GPU_IDS:", res[0]["gpu_ids"], res[0]["device"])
"""


def test_gpu_request_reaches_the_task(tmp_path, models):
    """A Ray that advertises one (fake) GPU: the task is given GPU 0; with the CPU build of
    torch it refuses to run on 'auto' instead of silently training on the CPU."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-c", _FAKE_GPU_SCRIPT, str(models[1]), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if torch.cuda.is_available():  # pragma: no cover - GPU machines train for real
        assert "GPU_IDS: ['0'] cuda" in proc.stdout
        return
    assert "REFUSED: Ray gave this task GPU(s) ['0'] but torch" in proc.stdout
    assert "GPU_IDS: ['0'] cpu" in proc.stdout


def test_bf16_autocast_trains_and_saves_fp32(tmp_path, corpus, models):
    from evoray.fusion.train import resolve_device

    _, target = models
    res = clm_train(
        target, corpus[0][:8], steps=3, lr=1e-2, batch_size=4, precision="bf16", out_dir=tmp_path
    )
    assert all(np.isfinite(res["losses"])) and res["loss_after"] < res["loss_before"]
    assert all(w.dtype == torch.float32 for w in _weights(tmp_path).values())
    if not torch.cuda.is_available():
        with pytest.raises(FusionError, match="torch sees no GPU"):
            resolve_device("cuda")
    with pytest.raises(FusionError, match="precision must be one of"):
        clm_train(target, corpus[0][:8], steps=1, precision="fp16", out_dir=tmp_path / "x")


def test_save_model_replaces_whole_folders_only(tmp_path, models, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evoray.fusion.train import save_model

    _, target = models
    model = AutoModelForCausalLM.from_pretrained(str(target))
    tok = AutoTokenizer.from_pretrained(str(target))
    out = save_model(model, tok, tmp_path / "m")
    before = (out / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(model, tok, out)
    assert (out / "model.safetensors").read_bytes() == before
    monkeypatch.undo()
    save_model(model, tok, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or old folders left


def test_cli_with_ray_runs_every_step_as_a_task(tmp_path, ray_local, capsys):
    from evoray.cli import main

    cfg = tmp_path / "fuse.yaml"
    cfg.write_text(
        "corpus: {seed: 2, n_train: 12, n_heldout: 4}\n"
        "resources: {num_cpus: 0.5}\n"
        "sources:\n"
        "  - {name: char, tokenizer: char, hidden: 16, steps: 1}\n"
        "  - {name: bpe70, tokenizer: bpe, vocab_size: 70, hidden: 16, steps: 1}\n"
        "target: {tokenizer: bpe, vocab_size: 50, hidden: 16}\n"
        "fusion: {k: 3, steps: 2, batch_size: 4, temperature: 2.0, kind: kl}\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    assert main(["fuse", str(cfg), "--use-ray", "--gpus-per-task", "1"]) == 2
    assert "gpus=1 but the Ray cluster has 0" in capsys.readouterr().err
    assert main(["fuse", str(cfg), "--use-ray", "--json", str(tmp_path / "r.json")]) == 0
    assert "target after FuseLLM" in capsys.readouterr().out
    import json

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["devices"] == ["cpu", "cpu"]
    for name in ("sources/char", "sources/bpe70", "target_init", "target_clm", "target_fused"):
        assert (tmp_path / "run" / name / "model.safetensors").is_file()
    assert not list((tmp_path / "run").glob(".*tmp*"))


def test_min_ce_per_token_vs_per_character(tmp_path, corpus, models):
    """Untrained models: the char source has the lower CE per token (small vocab), the BPE
    source the lower CE per character (a token covers ~3 characters): MinCE picks by unit."""
    from transformers import AutoTokenizer

    from evoray.fusion.teacher_build import fused_teachers

    sources, target = models
    texts = corpus[0][:3]
    dists = extract_all(sources, texts, tmp_path, k=4, use_ray=False)
    tok = AutoTokenizer.from_pretrained(str(target))

    def teachers(srcs, dirs, unit):
        return fused_teachers(tok, texts, srcs, dirs, "min_ce", "edit_distance", "all", unit)[1]

    for unit, pick in (("token", 0), ("char", 1)):
        got = teachers(sources, dists, unit)
        alone = teachers(sources[pick : pick + 1], dists[pick : pick + 1], unit)
        for a, b in zip(got, alone, strict=True):
            for x, y in zip(a, b, strict=True):
                torch.testing.assert_close(x, y)
    with pytest.raises(FusionError, match="ce_unit must be one of"):
        teachers(sources, dists, "word")


def test_corpus_files_and_their_errors(tmp_path):
    import json

    import pyarrow as pa

    from evoray.fusion.corpus import read_texts

    (tmp_path / "a.txt").write_text("one\n\ntwo\r\nthree\n")
    assert read_texts(tmp_path / "a.txt") == ["one", "two", "three"]
    assert read_texts(tmp_path / "a.txt", limit=2) == ["one", "two"]
    rows = [{"text": "x y"}, {"text": ""}, {"text": "z"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_texts(tmp_path / "b.jsonl") == ["x y", "z"]
    pq.write_table(pa.table({"body": ["p", "q"]}), tmp_path / "c.parquet")
    assert read_texts(tmp_path / "c.parquet", "body") == ["p", "q"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{oops\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    for path, field, needle in [
        (tmp_path / "bad.jsonl", "text", r"bad.jsonl, line 2: expected a JSON object"),
        (tmp_path / "broken.jsonl", "text", r"line 2"),
        (tmp_path / "c.parquet", "text", r"no column 'text' \(columns: body\)"),
        (tmp_path / "empty.txt", "text", "holds no non-empty texts"),
        (tmp_path / "missing.txt", "text", "not found"),
        (tmp_path / "a.csv", "text", "use one of .txt, .jsonl, .parquet"),
    ]:
        with pytest.raises(FusionError, match=needle):
            read_texts(path, field)


def test_texts_longer_than_the_model_are_refused(tmp_path, models):
    sources, target = models
    long_text = "the cat " * 400  # > 512 positions for every tokenizer here
    with pytest.raises(FusionError, match=r"text 1 is \d+ tokens .* over the model's 512"):
        clm_train(target, ["the cat .", long_text], steps=1, out_dir=tmp_path / "t")
    with pytest.raises(FusionError, match=r"source .*char.*text 0 is"):
        extract_all(sources[:1], [long_text], tmp_path / "d", use_ray=False)


def test_gpt2_bytelevel_source_aligns_with_a_metaspace_target(tmp_path, corpus, models):
    """Another architecture and word-marker convention ('Ġthe' vs '▁the') fuses end to end."""
    from transformers import AutoTokenizer

    from evoray.fusion.corpus import build_bytelevel_tokenizer

    _, target = models
    train = corpus[0]
    tok = build_bytelevel_tokenizer(train, 300)
    gpt2 = _save(tok, make_tiny_lm(tok, seed=3, hidden=16, arch="gpt2"), tmp_path / "gpt2")
    tgt_tok = AutoTokenizer.from_pretrained(str(target))
    vmap = checked_vocab_map(tok, tgt_tok)
    the = tgt_tok.convert_tokens_to_ids("▁the")
    assert vmap[tok.convert_tokens_to_ids("Ġthe")] == the
    res = fuse_train(target, [gpt2], train[:8], steps=2, k=4, lam=0.5, out_dir=tmp_path / "f")
    assert np.isfinite(res["losses"]).all()
    assert type(make_tiny_lm(tok, arch="gpt2")).__name__ == "GPT2LMHeadModel"
    with pytest.raises(ValueError, match="arch must be one of"):
        make_tiny_lm(tok, arch="mamba")


def test_teacher_store_round_trips_and_streams(tmp_path, corpus, models):
    """Fused teachers go to a memory-mapped file and come back bit-identical; distributions
    of other texts are refused with the text's index."""
    from transformers import AutoTokenizer

    from evoray.fusion.teacher_build import fused_teachers, iter_fused_teachers
    from evoray.fusion.teachers import TeacherStore, write_teacher_store

    sources, target = models
    texts = corpus[0][:7]
    dists = extract_all(sources, texts, tmp_path / "d", k=3, use_ray=False, shard_size=3)
    tok = AutoTokenizer.from_pretrained(str(target))
    ids, teachers = fused_teachers(tok, texts, sources, dists, "avg_ce")
    store = TeacherStore(
        write_teacher_store(
            tmp_path / "t.arrow",
            iter_fused_teachers(tok, texts, sources, dists, "avg_ce"),
            batch_rows=2,
        )
    )
    assert len(store) == len(texts) == len(store.ids)
    for i in range(len(texts)):
        assert store.ids[i].tolist() == ids[i]
        for got, want in zip(store[i], teachers[i], strict=True):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [p.name for p in tmp_path.glob(".t.arrow*")] == []  # no temp file left
    with pytest.raises(FusionError, match=r"text 3 differs"):
        fused_teachers(tok, [*texts[:3], "other", *texts[4:]], sources, dists, "avg_ce")
    with pytest.raises(FusionError, match="cover more texts"):
        fused_teachers(tok, texts[:5], sources, dists, "avg_ce")
    with pytest.raises(FusionError, match="no teacher rows"):
        write_teacher_store(tmp_path / "e.arrow", [])


def test_data_parallel_training_equals_one_process(tmp_path, corpus, models, ray_local):
    """Two DistributedDataParallel workers (Ray Train, gloo on CPU), each on half of every
    batch, train the same model as one process on whole batches."""
    from evoray.fusion.remote import run_data_parallel

    sources, target = models
    train = corpus[0][:12]
    dists = extract_all(sources, train, tmp_path / "d", k=4, use_ray=False)
    job = {
        "target_path": target,
        "source_paths": sources,
        "texts": train,
        "dist_dirs": dists,
        "k": 4,
        "lam": 0.5,
        "steps": 3,
        "lr": 1e-2,
        "batch_size": 4,
    }
    one = fuse_train(**job, out_dir=tmp_path / "one")
    # the ranks share one prebuilt store instead of building their own
    store = build_teachers(target, sources, train, dists, tmp_path / "teachers", part_size=5)
    two = run_data_parallel(
        (fuse_train, {**job, "out_dir": tmp_path / "two", "teachers": store}),
        workers=2,
        num_cpus=1,
        storage_path=tmp_path / "ray_train",
    )
    assert two["world_size"] == 2 and two["out_dir"] == tmp_path / "two"
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    wa, wb = _weights(one["out_dir"]), _weights(two["out_dir"])
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5)
    assert not list(tmp_path.glob(".two.teachers*"))
    with pytest.raises(FusionError, match="batch_size 3 must be a multiple of the 2 workers"):
        run_data_parallel(
            (clm_train, {"target_path": target, "texts": train, "steps": 1, "batch_size": 3,
                         "out_dir": tmp_path / "bad"}),
            workers=2,
            storage_path=tmp_path / "ray_train",
        )  # fmt: skip
    with pytest.raises(FusionError, match="3 data-parallel workers with cpus=1 each need 3"):
        run_data_parallel(
            (clm_train, {"target_path": target, "texts": train, "batch_size": 6,
                         "out_dir": tmp_path / "big"}),
            workers=3,
            storage_path=tmp_path / "ray_train",
        )  # fmt: skip


def test_teachers_built_in_parts_on_ray_equal_the_stream(tmp_path, corpus, models, ray_local):
    """Parts of 3 texts over shards of 4 (boundaries that do not line up), built as Ray tasks:
    the store equals the single stream; fuse_train on it equals fuse_train building its own."""
    from transformers import AutoTokenizer

    from evoray.fusion.teacher_build import fused_teachers
    from evoray.fusion.teachers import TeacherStore

    sources, target = models
    texts = corpus[0][:8]
    dists = extract_all(sources, texts, tmp_path / "d", k=3, use_ray=False, shard_size=4)
    lines: list[str] = []
    folder = build_teachers(
        target, sources, texts, dists, tmp_path / "t", part_size=3, use_ray=True,
        num_cpus=0.5, report=lines.append,
    )  # fmt: skip
    assert sorted(p.name for p in folder.iterdir()) == [f"part-0000{i}.arrow" for i in range(3)]
    assert "3 part(s), 8 texts" in lines[0]
    tok = AutoTokenizer.from_pretrained(str(target))
    ids, teachers = fused_teachers(tok, texts, sources, dists, "avg_ce")
    store = TeacherStore(folder)
    assert len(store) == 8
    for i in range(8):
        assert store.ids[i].tolist() == ids[i]
        for got, want in zip(store[i], teachers[i], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    job = {"target_path": target, "source_paths": sources, "texts": texts, "steps": 2, "k": 3}
    own = fuse_train(**job, dist_dirs=dists, out_dir=tmp_path / "own")
    shared = fuse_train(**job, teachers=folder, out_dir=tmp_path / "shared")
    assert own["losses"] == shared["losses"]
    with pytest.raises(FusionError, match="holds 8 texts, the corpus 7"):
        fuse_train(**{**job, "texts": texts[:7]}, teachers=folder, out_dir=tmp_path / "x")
    with pytest.raises(FusionError, match="hold 8 texts, the corpus 5"):
        build_teachers(target, sources, texts[:5], dists, tmp_path / "t2")
