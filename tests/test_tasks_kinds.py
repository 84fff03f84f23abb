"""Task kinds over user data: classification, text, qa, lm_eval, HF evaluate metrics, fitness.

Models and data are built here, offline: a 64-word word-level tokenizer (tests/factories.py),
tiny GPT-2 / Llama causal LMs and a tiny BERT classifier from configs, data written to tmp files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from evoray.errors import ConfigError
from evoray.tasks.pool import MultiTaskPool, make_task_pool
from tests.factories import WORDS, make_tokenizer, tiny_config

CONTENT = [w for w in WORDS if w not in ("the", "a", "an")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return AutoTokenizer.from_pretrained(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


def causal_lm(arch: str = "gpt2", seed: int = 0, **overrides):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(seed)
    cls = GPT2LMHeadModel if arch == "gpt2" else LlamaForCausalLM
    return cls(tiny_config(arch, **overrides)).eval()


def classifier(id2label: dict[int, str] | None = None, seed: int = 0):
    from transformers import BertForSequenceClassification

    torch.manual_seed(seed)
    kw = {"num_labels": 2}
    if id2label:
        kw = {"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    return BertForSequenceClassification(tiny_config("bert", **kw)).eval()


def sentences(n: int, seed: int, lo: int = 3, hi: int = 9) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (1,), generator=g))
        idx = torch.randint(0, len(CONTENT), (k,), generator=g).tolist()
        out.append(" ".join(CONTENT[i] for i in idx))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def ref_logprob(model, ids: list[int], start: int) -> tuple[float, bool]:
    """Sum of log p(ids[t] | ids[:t]) for t >= start, one unpadded sequence; and whether every
    such token is the argmax (the reference for greedy exact match)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = torch.log_softmax(logits, -1)
    targets = torch.tensor(ids[1:])
    pos = torch.arange(start - 1, len(ids) - 1)
    return float(logp[pos, targets[pos]].sum()), bool(
        (logits[pos].argmax(-1) == targets[pos]).all()
    )


# -- text -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_text_loglik_is_exact_per_token_mean_and_batch_independent(tmp_path, tok, arch):
    model = causal_lm(arch)
    texts = sentences(9, seed=1)
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"body": t} for t in texts])
    pool = make_task_pool(
        [{"name": "d", "kind": "text", "data": {"dev": dev}, "fields": {"text": "body"}}]
    )
    data = pool.encode(tok, "dev")
    s1 = pool.evaluate(model, data, batch_size=1)["d"]
    s4 = pool.evaluate(model, data, batch_size=4)["d"]
    total = n = 0
    for t in texts:
        ids = tok(t)["input_ids"]
        total += ref_logprob(model, ids, 1)[0]
        n += len(ids) - 1
    assert s1["loglik"] == pytest.approx(total / n, abs=1e-5)
    assert s4["loglik"] == pytest.approx(s1["loglik"], abs=1e-5)
    assert s1["perplexity"] == pytest.approx(math.exp(-s1["loglik"]), rel=1e-6)
    assert s1["tokens"] == n
    # loglik is the default fitness metric, higher is better
    assert pool.fitness({"d": s1}) == pytest.approx(s1["loglik"])


# -- qa ---------------------------------------------------------------------------------------


def greedy_pairs(model, tok, n: int, seed: int, k: int = 2) -> list[tuple[str, str]]:
    """(prompt, greedy k-token continuation) pairs, computed unpadded one at a time."""
    out = []
    for p in sentences(4 * n, seed):
        ids = torch.tensor([tok(p)["input_ids"]])
        gen = model.generate(ids, max_new_tokens=k, do_sample=False, pad_token_id=0)[0, -k:]
        if int(gen.min()) >= 7:  # no special tokens, so the text re-tokenises to the same ids
            out.append((p, tok.decode(gen)))
        if len(out) == n:
            return out
    raise AssertionError("too few usable prompts")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("generate", [False, True])
def test_qa_exact_match_is_greedy_generation(tmp_path, tok, arch, generate):
    """Half the answers are the model's own greedy continuation, half are changed in their
    last word: exact match is exactly 1/2, both from the teacher-forced pass and from real
    left-padded batched generation (prompts of different lengths share a batch)."""
    model = causal_lm(arch, seed=3)
    pairs = greedy_pairs(model, tok, 8, seed=5)
    rows = []
    for i, (p, a) in enumerate(pairs):
        if i % 2:
            words = a.split()
            words[-1] = next(w for w in CONTENT if w != words[-1])
            a = " ".join(words)
        rows.append({"q": p, "a": a})
    dev = write_jsonl(tmp_path / "qa.jsonl", rows)
    entry = {
        "name": "qa",
        "kind": "qa",
        "data": {"dev": dev},
        "fields": {"prompt": "q", "answer": "a"},
    }
    pool = make_task_pool([{**entry, "generate": generate}])
    data = pool.encode(tok, "dev")
    scores = pool.evaluate(model, data, batch_size=8)["qa"]
    assert scores["exact_match"] == pytest.approx(0.5)
    total = n = 0
    for r in rows:
        p = tok(r["q"])["input_ids"]
        a = tok(r["a"], add_special_tokens=False)["input_ids"]
        total += ref_logprob(model, p + a, len(p))[0]
        n += len(a)
    assert scores["answer_loglik"] == pytest.approx(total / n, abs=1e-5)


def test_qa_train_batch_masks_prompt_tokens(tmp_path, tok):
    rows = [{"prompt": "red cat", "answer": "dog"}, {"prompt": "sun", "answer": "moon star"}]
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    pool = make_task_pool([{"name": "q", "kind": "qa", "data": {"train": f, "dev": f}}])
    batch = pool.train_batch(tok, None, 8)
    assert batch.labels.shape == batch.input_ids.shape
    ids = tok.convert_tokens_to_ids
    assert batch.labels[0].tolist() == [-100, -100, ids("dog")]
    assert batch.labels[1].tolist() == [-100, ids("moon"), ids("star")]


# -- classification ---------------------------------------------------------------------------


def class_rows(n: int, seed: int) -> list[dict]:
    return [
        {"sentence": s, "other": s.split()[0], "y": ["neg", "pos"][i % 2]}
        for i, s in enumerate(sentences(n, seed))
    ]


def save_any(rows: list[dict], tmp_path: Path, fmt: str) -> str:
    frame = pd.DataFrame(rows)
    if fmt == "jsonl":
        return write_jsonl(tmp_path / "d.jsonl", rows)
    if fmt == "csv":
        frame.to_csv(tmp_path / "d.csv", index=False)
        return str(tmp_path / "d.csv")
    if fmt == "parquet":
        frame.to_parquet(tmp_path / "d.parquet")
        return str(tmp_path / "d.parquet")
    from datasets import Dataset, DatasetDict

    DatasetDict({"dev": Dataset.from_pandas(frame)}).save_to_disk(str(tmp_path / "ds"))
    return str(tmp_path / "ds")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "datasets"])
def test_classification_maps_label_names_to_the_head(tmp_path, tok, fmt):
    """Labels given as names go to the head's ids (label2id pos=0, neg=1, the reverse of
    alphabetical order), and accuracy is the reference argmax accuracy under that map."""
    model = classifier({0: "pos", 1: "neg"})
    rows = class_rows(12, seed=2)
    src = save_any(rows, tmp_path, fmt)
    entry = {
        "name": "c",
        "kind": "classification",
        "data": {"dev": src},
        "fields": {"text": "sentence", "text_pair": "other", "label": "y"},
    }
    pool = make_task_pool([entry])
    data = pool.encode(tok, "dev")
    scores = pool.evaluate(model, data, batch_size=5)["c"]
    enc = tok(
        [r["sentence"] for r in rows], [r["other"] for r in rows], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        preds = model(**enc).logits.argmax(-1)
    refs = torch.tensor([model.config.label2id[r["y"]] for r in rows])
    assert scores["accuracy"] == pytest.approx(float((preds == refs).float().mean()))


def test_classification_labels_the_head_lacks(tmp_path, tok):
    rows = [*class_rows(4, seed=3), {"sentence": "red cat", "other": "red", "y": "neutral"}]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    pool = make_task_pool(
        [
            {
                "name": "c",
                "kind": "classification",
                "data": {"dev": src},
                "fields": {"text": "sentence", "label": "y"},
            }
        ]
    )
    data = pool.encode(tok, "dev")  # the tokenizer folder has no model config: mapped later
    with pytest.raises(ConfigError) as err:
        pool.evaluate(classifier({0: "neg", 1: "pos"}), data, batch_size=4)
    msg = str(err.value)
    assert "bad.jsonl" in msg and "'y'" in msg and "'neutral'" in msg
    # the same check on the driver, from a member's config, before any worker starts
    with pytest.raises(ConfigError, match=r"bad.jsonl, field 'y': label 'neutral'"):
        pool.check_model(classifier({0: "neg", 1: "pos"}).config)
    pool.check_model(classifier({0: "neg", 1: "pos", 2: "neutral"}).config)  # fits: no error


def test_classification_task_labels_list_maps_at_encode(tmp_path, tok):
    src = write_jsonl(tmp_path / "d.jsonl", class_rows(4, seed=4))
    entry = {
        "name": "c",
        "kind": "classification",
        "data": {"dev": src},
        "labels": ["pos", "neg"],
        "fields": {"text": "sentence", "label": "y"},
    }
    data = make_task_pool([entry]).encode(tok, "dev")["c"]
    assert data.labels.tolist() == [1, 0, 1, 0]


# -- bad input --------------------------------------------------------------------------------


def test_missing_field_names_file_and_field(tmp_path):
    src = write_jsonl(tmp_path / "dev.jsonl", [{"text": "red cat"}, {"txt": "dog"}])
    with pytest.raises(ConfigError) as err:
        make_task_pool([{"name": "d", "kind": "text", "data": {"dev": src}}], "run.yaml")
    msg = str(err.value)
    assert "run.yaml" in msg and "dev.jsonl" in msg and "row 1" in msg and "'text'" in msg


def test_empty_split_is_refused_at_load(tmp_path):
    src = tmp_path / "dev.jsonl"
    src.write_text("")
    with pytest.raises(ConfigError, match=r"split 'dev' .*dev.jsonl.* is empty"):
        make_task_pool([{"name": "d", "kind": "text", "data": {"dev": str(src)}}])


def test_text_longer_than_positions_refused_naming_task_split_example(tmp_path, tok):
    model = causal_lm("gpt2", n_positions=8)
    texts = ["red cat", "red cat dog bird fish tree river stone cloud rain", "sun"]
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    pool = make_task_pool([{"name": "long", "kind": "text", "data": {"dev": src}}])
    data = pool.encode(tok, "dev")
    with pytest.raises(
        ConfigError, match=r"task 'long', split 'dev', example 1: .* 10 tokens, more than 8"
    ):
        pool.evaluate(model, data)


def test_truncation_rule(tmp_path, tok):
    """text keeps its first max_length tokens; qa keeps the answer and the end of the prompt."""
    src = write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "red cat dog bird fish", "prompt": "red cat dog bird", "answer": "fish tree"}],
    )
    base = {"data": {"dev": src}, "max_length": 3, "truncate": True}
    pool = make_task_pool(
        [{**base, "name": "t", "kind": "text"}, {**base, "name": "q", "kind": "qa"}]
    )
    data = pool.encode(tok, "dev")
    ids = tok.convert_tokens_to_ids
    assert data["t"].split.input_ids[0].tolist() == ids(["red", "cat", "dog"])
    assert data["q"].split.input_ids[0].tolist() == ids(["bird", "fish", "tree"])
    with pytest.raises(ConfigError, match="truncate: true needs max_length"):
        make_task_pool([{"name": "t", "kind": "text", "data": {"dev": src}, "truncate": True}])


def test_unknown_kind_key_and_duplicate_names(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "red cat"}])
    with pytest.raises(ConfigError, match=r"tasks\[d\]\.colour: not a setting"):
        make_task_pool([{"name": "d", "kind": "text", "data": {"dev": src}, "colour": 1}])
    with pytest.raises(ConfigError, match="used twice"):
        make_task_pool([{"name": "d", "kind": "text", "data": {"dev": src}}] * 2)


def test_relative_paths_resolve_against_config_folder(tmp_path, tok):
    write_jsonl(tmp_path / "d.jsonl", [{"text": "red cat dog"}])
    pool = make_task_pool(
        [{"name": "d", "kind": "text", "data": {"dev": "d.jsonl"}}], base_dir=tmp_path
    )
    assert len(pool.encode(tok, "dev")["d"]) == 1


# -- fitness ----------------------------------------------------------------------------------


def test_fitness_weighted_mean_ood_apart_lower_is_better_negated(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "red cat", "prompt": "a", "answer": "b"}])
    pool = make_task_pool(
        [
            {"name": "a", "kind": "qa", "data": {"dev": src}, "weight": 3.0},
            {"name": "b", "kind": "text", "data": {"dev": src}, "metric": "perplexity"},
            {"name": "o", "kind": "qa", "data": {"dev": src}, "ood": True},
        ]
    )
    assert isinstance(pool, MultiTaskPool)
    assert pool.names() == ["a", "b"] and pool.ood_names() == ["o"]
    scores = {"a": {"exact_match": 0.5}, "b": {"perplexity": 10.0}}
    assert pool.fitness(scores) == pytest.approx((3 * 0.5 - 10.0) / 4)
    # an OOD score handed in with the dev scores does not move the fitness
    assert pool.fitness({**scores, "o": {"exact_match": 1.0}}) == pool.fitness(scores)
    assert pool.metric("a") == "exact_match"


# -- HF evaluate metrics ----------------------------------------------------------------------

METRIC_MODULE = """
import datasets
import evaluate


class TwiceMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="2 x accuracy", citation="", inputs_description="",
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        hits = sum(int(p == r) for p, r in zip(predictions, references))
        return {"twice_match": 2.0 * hits / len(references)}
"""


def test_local_evaluate_metric_module(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = tmp_path / "twice_match.py"
    module.write_text(METRIC_MODULE)
    src = write_jsonl(tmp_path / "d.jsonl", class_rows(10, seed=6))
    entry = {
        "name": "c",
        "kind": "classification",
        "data": {"dev": src},
        "fields": {"text": "sentence", "label": "y"},
        "evaluate_metrics": [str(module)],
        "metric": "twice_match",
    }
    pool = make_task_pool([entry])
    scores = pool.evaluate(classifier({0: "neg", 1: "pos"}), pool.encode(tok, "dev"))["c"]
    assert scores["twice_match"] == pytest.approx(2 * scores["accuracy"])
    assert pool.fitness({"c": scores}) == scores["twice_match"]


# -- lm_eval ----------------------------------------------------------------------------------


def write_lm_eval_task(folder: Path, n: int = 12) -> list[dict]:
    """A local multiple-choice task YAML with local json data (validation and test)."""
    docs = []
    for i, s in enumerate(sentences(2 * n, seed=7)):
        choices = [CONTENT[(i + j) % len(CONTENT)] for j in range(3)]
        docs.append({"question": s, "choices": choices, "label": i % 3})
    write_jsonl(folder / "val.jsonl", docs[:n])
    write_jsonl(folder / "test.jsonl", docs[n:])
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    validation: {folder / 'val.jsonl'}\n"
        f"    test: {folder / 'test.jsonl'}\n"
        "output_type: multiple_choice\n"
        "validation_split: validation\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n"
    )
    return docs


def test_lm_eval_local_yaml_on_in_memory_model(tmp_path, tok, monkeypatch):
    """lm-eval scores the in-memory model; acc equals the reference argmax-loglik accuracy on
    the split chosen as dev (validation) and as test (test), with limit."""
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = write_lm_eval_task(tmp_path)
    model = causal_lm("gpt2", seed=4)
    entry = {
        "name": "mc",
        "kind": "lm_eval",
        "task": "tiny_mc",
        "include_path": str(tmp_path),
        "metric": "acc",
        "splits": {"dev": "validation", "test": "test"},
        "limit": 10,
    }
    pool = make_task_pool([entry])
    for split, part in (("dev", docs[:10]), ("test", docs[12:22])):
        got = pool.evaluate(model, pool.encode(tok, split), batch_size=4)["mc"]["acc"]
        hits = 0
        for d in part:
            p = tok(d["question"])["input_ids"]
            lls = [ref_logprob(model, p + tok(c)["input_ids"], len(p))[0] for c in d["choices"]]
            hits += int(max(range(3), key=lls.__getitem__) == d["label"])
        assert got == pytest.approx(hits / len(part)), split


def test_lm_eval_unknown_task_names_close_ones(tmp_path):
    pytest.importorskip("lm_eval")
    write_lm_eval_task(tmp_path)
    entry = {"name": "mc", "kind": "lm_eval", "task": "tiny_mcq", "include_path": str(tmp_path)}
    with pytest.raises(
        ConfigError, match=r"unknown lm-eval task 'tiny_mcq'.*close names: .*tiny_mc"
    ):
        make_task_pool([entry])


def test_lm_eval_not_installed_gives_pip_command(monkeypatch):
    import builtins

    import evoray.tasks.lm_eval_task as mod

    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    monkeypatch.setattr(mod, "_MANAGERS", {})
    with pytest.raises(ConfigError, match=r"pip install 'evoray\[lm-eval\]'"):
        make_task_pool([{"name": "arc", "kind": "lm_eval", "task": "arc_easy"}])


# -- the worker's fitness ---------------------------------------------------------------------


def test_worker_fitness_is_the_pools_weighted_fitness(tmp_path):
    """An in-process worker on a tiny Llama folder scores a text + qa pool: its fitness is the
    weighted mean of the tasks' own metrics, and its scores equal direct evaluation."""
    from evoray.execution.worker import OffspringWorker, WorkerSpec
    from evoray.models.pool import ModelPool
    from evoray.weights.checkpoint import open_checkpoint
    from evoray.weights.flat import flatten
    from tests.factories import make_tiny_model

    path = make_tiny_model(tmp_path / "m", arch="llama", seed=0)
    rows = [{"text": s, "prompt": s, "answer": "red cat"} for s in sentences(6, seed=8)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    pool = make_task_pool(
        [
            {"name": "t", "kind": "text", "data": {"dev": src}, "weight": 1.0},
            {
                "name": "q",
                "kind": "qa",
                "data": {"dev": src},
                "weight": 3.0,
                "metric": "answer_loglik",
            },
        ]
    )
    layout = ModelPool(members=(str(path), str(path))).layout()
    worker = OffspringWorker(WorkerSpec(model_path=str(path), layout=layout, tasks=pool))
    with open_checkpoint(str(path)) as ckpt:
        flat = flatten(ckpt, layout).data
    out = worker.evaluate_vector(flat)
    s = out["scores"]
    assert out["fitness"] == pytest.approx((s["t"]["loglik"] + 3 * s["q"]["answer_loglik"]) / 4)
    tok = AutoTokenizer.from_pretrained(str(path))
    from transformers import AutoModelForCausalLM

    direct = pool.evaluate(AutoModelForCausalLM.from_pretrained(str(path)), pool.encode(tok, "dev"))
    assert s["t"]["loglik"] == pytest.approx(direct["t"]["loglik"], abs=1e-5)


def test_results_table_uses_each_tasks_metric(tmp_path):
    """The results table shows each task's own metric and the pool's fitness as in-domain."""
    from evoray.report.results import run_table
    from tests.factories import make_tiny_model

    path = make_tiny_model(tmp_path / "m", arch="llama", seed=0)
    rows = [{"text": s, "prompt": s, "answer": "red cat"} for s in sentences(4, seed=9)]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    entries = [
        {"name": "t", "kind": "text", "data": {"dev": src, "test": src}},
        {"name": "q", "kind": "qa", "data": {"dev": src, "test": src}, "metric": "answer_loglik"},
    ]
    pool = make_task_pool(entries)
    table = run_table([str(path)], pool, [])
    from transformers import AutoModelForCausalLM

    tok = AutoTokenizer.from_pretrained(str(path))
    s = pool.evaluate(AutoModelForCausalLM.from_pretrained(str(path)), pool.encode(tok, "test"))
    cells = table.splitlines()[2].split(" | ")
    assert cells[1:4] == [
        f"{s['t']['loglik']:.3f}",
        f"{s['q']['answer_loglik']:.3f}",
        f"{pool.fitness(s):.3f}",
    ]


def test_results_table_shows_lower_is_better_metric_as_itself(tmp_path):
    """Tasks scored by perplexity: fitness maximises its negation, but the table's in-domain
    column shows the mean perplexity (positive) and says lower is better."""
    from transformers import AutoModelForCausalLM

    from evoray.report.results import run_table
    from tests.factories import make_tiny_model

    path = make_tiny_model(tmp_path / "m", arch="llama", seed=0)
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": s} for s in sentences(4, seed=3)])
    entries = [
        {"name": n, "kind": "text", "data": {"dev": src, "test": src}, "metric": "perplexity"}
        for n in ("a", "b")
    ]
    pool = make_task_pool(entries)
    table = run_table([str(path)], pool, [])
    tok = AutoTokenizer.from_pretrained(str(path))
    s = pool.evaluate(AutoModelForCausalLM.from_pretrained(str(path)), pool.encode(tok, "test"))
    head, _, row = table.splitlines()[:3]
    assert "in-domain (perplexity, lower is better)" in head
    cells = row.split(" | ")
    assert pool.fitness(s) < 0
    assert (
        cells[3]
        == f"{-pool.fitness(s):.3f}"
        == f"{(s['a']['perplexity'] + s['b']['perplexity']) / 2:.3f}"
    )


def test_hub_dataset_id_goes_to_load_dataset(monkeypatch, tok):
    """A source that is no local path is a hub id (``name:config``): not read at config load
    (no network there), loaded with datasets.load_dataset at encoding."""
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"text": "red cat dog"}, {"text": "sun moon"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    pool = make_task_pool(
        [{"name": "h", "kind": "text", "data": "user/corpus:en", "splits": {"dev": "validation"}}]
    )
    assert calls == []
    data = pool.encode(tok, "dev")
    assert calls == [("user/corpus", "en", "validation")] and len(data["h"]) == 2


def test_task_without_test_split_is_left_out_of_test_scores(tmp_path, tok):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": "red cat dog"}])
    pool = make_task_pool(
        [
            {"name": "a", "kind": "text", "data": {"dev": src, "test": src}},
            {"name": "b", "kind": "text", "data": {"dev": src}},
        ]
    )
    assert list(pool.encode(tok, "test")) == ["a"]
    with pytest.raises(ConfigError, match="task 'b' has no 'train' split"):
        pool.train_batch(tok, ["b"], 4)


def test_quiet_worker_draws_no_lm_eval_progress_bars(tmp_path, tok, monkeypatch, capfd):
    """`evoray run -q` reaches the workers: an lm_eval task scored by a quiet worker prints no
    tqdm bar (lm-eval passes ``disable=`` itself, so the bars are forced off)."""
    pytest.importorskip("lm_eval")
    import tqdm
    import tqdm.auto

    from evoray.execution.worker import silence_progress_bars

    for cls in {tqdm.tqdm, tqdm.auto.tqdm}:  # restored after the test
        if "__init__" in cls.__dict__:
            monkeypatch.setattr(cls, "__init__", cls.__dict__["__init__"])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_lm_eval_task(tmp_path)
    entry = {"name": "mc", "kind": "lm_eval", "task": "tiny_mc", "include_path": str(tmp_path)}
    pool = make_task_pool([{**entry, "metric": "acc", "limit": 4}])
    model = causal_lm("gpt2", seed=4)
    pool.evaluate(model, pool.encode(tok, "dev"), batch_size=4)
    assert "it/s]" in capfd.readouterr().err  # lm-eval's bars, before
    silence_progress_bars()
    pool.evaluate(model, pool.encode(tok, "dev"), batch_size=4)
    err = capfd.readouterr().err
    assert "it/s]" not in err and "%|" not in err, err[-500:]
