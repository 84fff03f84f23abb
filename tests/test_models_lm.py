"""Members load as their own architecture class; the whole checkpoint is the weight space.

For tiny Llama (tied and untied), Qwen2, Mistral and GPT-2 (tied and untied) causal LMs and
BERT / RoBERTa classifiers: load, flatten, bind into a worker, build an offspring, export it and
reload it with the auto class; the reloaded model computes the worker's logits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from evoray.errors import ConfigError, LayoutError
from evoray.execution.worker import OffspringWorker, WorkerSpec
from evoray.models.pool import ModelPool, load_model
from evoray.strategies.de import Recipe
from evoray.tasks.pool import ZooTasks
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.export import write_flat_model
from evoray.weights.flat import FlatWeights, flatten, to_numpy
from tests.lm_fixtures import CAUSAL, CLASSIFIERS, TextLogLik, TinyClassification, make_model

IDS = torch.tensor([[7, 12, 30, 41, 9, 22, 55, 13], [8, 8, 19, 33, 60, 2, 17, 40]])


def _members(tmp_path: Path, arch: str) -> tuple[str, str]:
    a = make_model(tmp_path / f"{arch}-a", arch, seed=0)
    b = make_model(tmp_path / f"{arch}-b", arch, seed=0, noise=0.05)
    return str(a), str(b)


def _tied(arch: str) -> bool:
    return arch in ("llama-tied", "gpt2")


def _roundtrip(tmp_path: Path, arch: str, tasks, auto_cls) -> None:
    a, b = _members(tmp_path, arch)
    pool = ModelPool((a, b))
    layout = pool.layout()
    model, _ = load_model(a)
    assert type(model).__name__ == {**CAUSAL, **CLASSIFIERS}[arch][1]
    # Every tensor of the model is in the weight space, a tied head counted once.
    unique = {id(p): p for p in model.parameters()}
    assert layout.numel == sum(p.numel() for p in unique.values())
    names = set(layout.names)
    head = "lm_head.weight" if arch in CAUSAL else None
    if head:
        assert (head in names) != _tied(arch)
    pool.check_tasks(tasks)

    t0 = time.perf_counter()
    worker = OffspringWorker(WorkerSpec(a, layout, tasks, metric=tasks_metric(tasks)))
    flats = []
    for m in (a, b):
        with open_checkpoint(m) as c:
            flats.append(flatten(c, layout))
    worker.set_population(*(f.data for f in flats))
    result = worker.evaluate_recipe(Recipe(target=0, refs=(1,), F=0.7, CR=0.8, seed=3))
    build_eval = time.perf_counter() - t0
    assert torch.isfinite(torch.tensor(result["fitness"]))
    wm = worker.model
    if _tied(arch):
        emb = wm.get_input_embeddings().weight
        assert wm.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    # The worker's model is the offspring vector, not member a.
    offspring = FlatWeights(layout, to_numpy(worker.buffer))
    assert not torch.equal(offspring.as_tensor(), flats[0].as_tensor())

    out = write_flat_model(offspring, a, tmp_path / f"{arch}-out", recipe_yaml="{}", method="t")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written = set(f.keys())
    assert ("lm_head.weight" in written) == (head is not None and not _tied(arch))
    reloaded = auto_cls.from_pretrained(str(out)).eval()
    for n in layout.names:
        assert torch.equal(reloaded.get_parameter(n), offspring.tensor(n)), n
    if _tied(arch):
        assert reloaded.get_output_embeddings().weight.data_ptr() == (
            reloaded.get_input_embeddings().weight.data_ptr()
        )
    mask = torch.ones_like(IDS)
    with torch.no_grad():
        want = wm(input_ids=IDS, attention_mask=mask).logits
        got = reloaded(input_ids=IDS, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    print(f"{arch}: {layout.numel} params, worker start + offspring + eval {build_eval:.3f}s")


def tasks_metric(tasks) -> str:
    return "loglik" if isinstance(tasks, TextLogLik) else "accuracy"


@pytest.mark.parametrize("arch", list(CAUSAL))
def test_causal_lm_roundtrip(tmp_path: Path, arch: str) -> None:
    _roundtrip(tmp_path, arch, TextLogLik(), AutoModelForCausalLM)


@pytest.mark.parametrize("arch", list(CLASSIFIERS))
def test_classifier_roundtrip(tmp_path: Path, arch: str) -> None:
    _roundtrip(tmp_path, arch, TinyClassification(), AutoModelForSequenceClassification)


def test_tied_head_written_twice_is_counted_once(tmp_path: Path) -> None:
    """Some exporters write a tied head as its own tensor: it is still one weight, stays tied
    in the worker, and is not written back (the reload ties it to the evolved embedding)."""
    a, b = _members(tmp_path, "gpt2")
    for m in (a, b):
        f = Path(m) / "model.safetensors"
        sd = load_file(str(f))
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()
        save_file(sd, str(f), metadata={"format": "pt"})
    layout = ModelPool((a, b)).layout()
    assert "lm_head.weight" not in layout.names
    assert layout.tied == (("lm_head.weight", "transformer.wte.weight"),)
    worker = OffspringWorker(WorkerSpec(a, layout, TextLogLik(), metric="loglik"))
    wm = worker.model
    assert wm.lm_head.weight.data_ptr() == wm.transformer.wte.weight.data_ptr()
    flat = FlatWeights(layout, to_numpy(worker.buffer))
    flat.tensor("transformer.wte.weight").add_(0.5)
    out = write_flat_model(flat, a, tmp_path / "out", recipe_yaml="{}", method="t")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    torch.testing.assert_close(reloaded.lm_head.weight, flat.tensor("transformer.wte.weight"))


def test_causal_lm_on_the_classification_zoo_is_an_error(tmp_path: Path) -> None:
    a, b = _members(tmp_path, "gpt2")
    layout = ModelPool((a, b)).layout()
    with pytest.raises(ConfigError, match=r"gpt2-a.*causal LM.*'zoo'"):
        ModelPool((a, b)).check_tasks(ZooTasks())
    with pytest.raises(ConfigError, match=r"gpt2-a.*'zoo'"):
        OffspringWorker(WorkerSpec(a, layout, ZooTasks()))
    # ... and a classifier on causal-LM tasks.
    c, d = _members(tmp_path, "bert")
    with pytest.raises(ConfigError, match=r"bert-a.*classifier.*'test_text'"):
        ModelPool((c, d)).check_tasks(TextLogLik())


def test_random_head_is_never_silently_added(tmp_path: Path) -> None:
    """A GPT-2 checkpoint whose config names no architecture loads as a classifier; its
    classification head is not in the checkpoint, so binding refuses instead of scoring noise."""
    a, b = _members(tmp_path, "gpt2")
    cfg_file = Path(a) / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["architectures"]
    cfg_file.write_text(json.dumps(cfg))
    layout = ModelPool((a, b)).layout()
    with pytest.raises(ValueError, match=r"score\.weight is not in the weight space"):
        OffspringWorker(WorkerSpec(a, layout, TinyClassification()))


def test_other_architecture_named_before_work(tmp_path: Path) -> None:
    a, _ = _members(tmp_path, "llama")
    q = make_model(tmp_path / "qwen", "qwen2")
    with pytest.raises(LayoutError, match=r"'model_type' is 'qwen2' in .*qwen but 'llama' in"):
        ModelPool((a, str(q))).layout()


def test_other_vocabulary_named_before_work(tmp_path: Path) -> None:
    a, _ = _members(tmp_path, "llama")
    v = make_model(tmp_path / "bigvocab", "llama", vocab_size=72)
    with pytest.raises(LayoutError, match=r"'vocab_size' is 72 in .*bigvocab but 64 in .*llama-a"):
        ModelPool((a, str(v))).layout()
    # The base is checked too.
    w = make_model(tmp_path / "wide", "llama", intermediate_size=48)
    with pytest.raises(LayoutError, match=r"config field 'intermediate_size'"):
        ModelPool((a, a), base=str(w)).layout()


def test_worker_spec_carries_the_safety_flags(tmp_path: Path) -> None:
    """A pickle-only member loads in the worker only when the run allows pickle."""
    from tests.factories import _safetensors_to_pickle

    a, b = _members(tmp_path, "llama")
    layout = ModelPool((a, b)).layout()
    _safetensors_to_pickle(Path(a))
    from evoray.errors import CheckpointError

    with pytest.raises(CheckpointError, match="pickle"):
        OffspringWorker(WorkerSpec(a, layout, TextLogLik(), metric="loglik"))
    worker = OffspringWorker(
        WorkerSpec(a, layout, TextLogLik(), metric="loglik", allow_pickle=True)
    )
    assert worker.load(a).size == layout.numel
    assert ModelPool((a, b), allow_pickle=True).layout().numel == layout.numel


class _Seq2SeqLogLik(TextLogLik):
    """Log-likelihood of each text given itself, for an encoder-decoder."""

    kind = "test_seq2seq"
    model_kind = "seq2seq"

    def evaluate(self, model, data, *, batch_size: int = 8):
        out = {}
        with torch.no_grad():
            for name, s in data.items():
                labels = s.input_ids.masked_fill(s.attention_mask == 0, -100)
                loss = model(
                    input_ids=s.input_ids, attention_mask=s.attention_mask, labels=labels
                ).loss
                out[name] = {"loglik": -float(loss)}
        return out


def test_seq2seq_roundtrip(tmp_path: Path) -> None:
    """A T5 (shared embedding tied to both stacks and the head) is one weight space too."""
    from transformers import AutoModelForSeq2SeqLM

    a, b = _members(tmp_path, "t5")
    layout = ModelPool((a, b)).layout()
    model, _ = load_model(a)
    assert type(model).__name__ == "T5ForConditionalGeneration"
    assert layout.numel == sum(p.numel() for p in model.parameters())
    worker = OffspringWorker(WorkerSpec(a, layout, _Seq2SeqLogLik(), metric="loglik"))
    flats = []
    for m in (a, b):
        with open_checkpoint(m) as c:
            flats.append(flatten(c, layout))
    worker.set_population(*(f.data for f in flats))
    worker.evaluate_recipe(Recipe(target=0, refs=(1,), F=0.7, CR=0.8, seed=3))
    offspring = FlatWeights(layout, to_numpy(worker.buffer))
    out = write_flat_model(offspring, a, tmp_path / "t5-out", recipe_yaml="{}", method="t")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(str(out)).eval()
    dec = IDS[:, :4]
    with torch.no_grad():
        want = worker.model(input_ids=IDS, decoder_input_ids=dec).logits
        got = reloaded(input_ids=IDS, decoder_input_ids=dec).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_other_tokenizer_with_the_same_shapes_is_named(tmp_path: Path) -> None:
    """Same config and tensor shapes, but a token id means another token: merging would mix
    embedding rows of different tokens, so the pool refuses naming the id and both models."""
    a, b = _members(tmp_path, "llama")
    tj = Path(b) / "tokenizer.json"
    data = json.loads(tj.read_text())
    vocab = data["model"]["vocab"]
    vocab["cat"], vocab["dog"] = vocab["dog"], vocab["cat"]
    tj.write_text(json.dumps(data))
    with pytest.raises(LayoutError, match=r"token id \d+ is '(cat|dog)' in .*llama-b but"):
        ModelPool((a, b)).layout()
    # An added token past the shared ids is fine.
    data = json.loads((Path(a) / "tokenizer.json").read_text())
    data["added_tokens"].append({**data["added_tokens"][0], "id": 64, "content": "<extra>"})
    tj.write_text(json.dumps(data))
    ModelPool((a, b)).layout()


def test_tied_and_untied_heads_are_named(tmp_path: Path) -> None:
    a, _ = _members(tmp_path, "llama-tied")
    u = make_model(tmp_path / "untied", "llama")
    with pytest.raises(LayoutError, match=r"'tie_word_embeddings' is False in .*untied but True"):
        ModelPool((a, str(u))).layout()


def test_untied_default_of_the_model_type_is_respected(tmp_path: Path) -> None:
    """A Llama config.json without tie_word_embeddings is untied (Llama's default), so its
    lm_head stays a tensor of its own in the weight space."""
    a, b = _members(tmp_path, "llama")
    for m in (a, b):
        f = Path(m) / "config.json"
        cfg = json.loads(f.read_text())
        del cfg["tie_word_embeddings"]
        f.write_text(json.dumps(cfg))
    layout = ModelPool((a, b)).layout()
    assert "lm_head.weight" in layout.names and layout.tied == ()
