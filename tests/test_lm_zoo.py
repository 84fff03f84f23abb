"""The embedded causal-LM zoo: skills data, build/reuse/determinism, quality, lm-eval tasks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evoray.models.lm_zoo import LMZooSpec, build_lm_zoo, exact_match, make_lm_tokenizer
from evoray.tasks import skills

REPO = Path(__file__).resolve().parents[1]
LM_EVAL_TASKS = REPO / "search_spaces" / "lm_eval_tasks"
# Fast settings: for plumbing and determinism, not for accuracy claims.
SMALL = {"hidden_size": 32, "pretrain_steps": 120, "finetune_steps": 60}


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def small_lm_zoo(tmp_path_factory: pytest.TempPathFactory):
    return build_lm_zoo(tmp_path_factory.mktemp("lmzoo"), LMZooSpec(**SMALL), report=_quiet)


def test_skills_answers_are_correct_and_deterministic() -> None:
    recs = skills.skill_split("sort", "dev", seed=3)
    assert recs == skills.skill_split("sort", "dev", seed=3)
    assert recs != skills.skill_split("sort", "dev", seed=4)
    for r in recs:
        digits = r["prompt"].removeprefix("sort ").removesuffix(" =").split()
        assert r["answer"].split() == sorted(digits)
    for r in skills.skill_split("arithmetic", "test"):
        _, a, _, b, _ = r["prompt"].split()
        assert "".join(r["answer"].split()) == str(int(a) + int(b))
    for r in skills.skill_split("reverse", "train", n=50):
        assert r["answer"].split() == r["prompt"].split()[1:-1][::-1]
    # Every token of every skill is in the tokenizer's vocabulary (no <unk> in the data).
    tok = make_lm_tokenizer()
    for name in skills.GENERATORS:
        for r in skills.skill_split(name, "dev"):
            assert tok.unk_token_id not in tok(skills.qa_text(r))["input_ids"], r


def test_build_writes_models_data_and_manifest_then_reuses(small_lm_zoo, tmp_path) -> None:
    zoo = small_lm_zoo
    assert set(zoo.experts) == set(skills.EXPERT_SKILLS)
    for path in (zoo.base, *zoo.experts.values()):
        config = json.loads((path / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"]
        assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    manifest = json.loads((zoo.root / "lm_zoo.json").read_text())
    assert manifest["spec"]["hidden_size"] == 32 and manifest["build_seconds"] > 0
    # The task entries (contract format) point at jsonl files with the declared fields.
    by_name = {t["name"]: t for t in zoo.tasks}
    assert [t["name"] for t in zoo.tasks if not t["ood"]] == list(skills.EXPERT_SKILLS)
    assert by_name["copy"]["ood"] and by_name["prose"]["kind"] == "text"
    for t in zoo.tasks:
        for split in ("train", "dev", "test"):
            rows = [json.loads(x) for x in Path(t["data"][split]).read_text().splitlines()]
            assert len(rows) == skills.SPLIT_SIZES[split]
            assert set(rows[0]) == set(t["fields"].values())
    # Second call: reused from the manifest, nothing rebuilt.
    mtime = (zoo.base / "model.safetensors").stat().st_mtime_ns
    messages: list[str] = []
    again = build_lm_zoo(zoo.root.parent, LMZooSpec(**SMALL), report=messages.append)
    assert messages == [] and again.experts == zoo.experts
    assert (zoo.base / "model.safetensors").stat().st_mtime_ns == mtime
    # Another setting is another zoo beside it, not the stale one.
    assert LMZooSpec(**{**SMALL, "num_layers": 3}).key != zoo.spec.key


def test_build_is_deterministic(small_lm_zoo, tmp_path) -> None:
    other = build_lm_zoo(tmp_path, LMZooSpec(**SMALL), report=_quiet)
    for name, path in small_lm_zoo.experts.items():
        a = load_file(path / "model.safetensors")
        b = load_file(other.experts[name] / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_default_zoo_experts_are_good_at_their_skill_and_near_base_elsewhere(tmp_path) -> None:
    """The claim the README makes, on the default zoo (about 70 s on one core)."""
    from transformers import LlamaForCausalLM

    zoo = build_lm_zoo(tmp_path, report=_quiet)
    tok = make_lm_tokenizer()

    def em(path: Path, skill: str) -> float:
        model = LlamaForCausalLM.from_pretrained(path)
        return exact_match(model, tok, skills.skill_split(skill, "test"))

    base = {s: em(zoo.base, s) for s in (*skills.EXPERT_SKILLS, "copy")}
    assert max(base[s] for s in skills.EXPERT_SKILLS) < 0.05
    assert base["copy"] > 0.6
    for skill, path in zoo.experts.items():
        own = em(path, skill)
        assert own > 0.75, (skill, own)
        others = [em(path, s) for s in skills.EXPERT_SKILLS if s != skill]
        assert max(others) < 0.1, (skill, others)
        assert em(path, "copy") > base["copy"] - 0.35, skill


def test_zoo_pool_causal_lm(small_lm_zoo) -> None:
    from evoray.errors import ConfigError
    from evoray.models.pool import zoo_pool

    with pytest.raises(ConfigError, match=r"models\.zoo\.n_domains"):
        zoo_pool({"kind": "causal_lm", "n_domains": 3})
    with pytest.raises(ConfigError, match=r"models\.zoo\.kind"):
        zoo_pool({"kind": "seq2seq"})
    if importlib.util.find_spec("evoray.tasks.kinds") is None:
        pytest.skip("the qa/text task kinds (the other issue-11 part) are not merged yet")
    pool, tasks = zoo_pool({"kind": "causal_lm", "root": str(small_lm_zoo.root.parent), **SMALL})
    assert pool.members == tuple(str(p) for p in small_lm_zoo.experts.values())
    assert pool.member_tasks == skills.EXPERT_SKILLS
    assert tasks.names() == list(skills.EXPERT_SKILLS)
    assert set(tasks.ood_names()) == {"copy", "prose"}


def test_shipped_lm_eval_data_matches_the_generator(tmp_path) -> None:
    skills.write_lm_eval_data(tmp_path)
    for name in skills.GENERATORS:
        for split in ("dev", "test"):
            shipped = (LM_EVAL_TASKS / "data" / name / f"{split}.jsonl").read_text()
            assert shipped == (tmp_path / name / f"{split}.jsonl").read_text(), (name, split)


def test_lm_eval_tasks_parse_and_score_an_expert_offline(small_lm_zoo, monkeypatch) -> None:
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import LlamaForCausalLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(small_lm_zoo.root)  # the data is found from the YAMLs' folder, not cwd
    tm = TaskManager(include_path=str(LM_EVAL_TASKS))
    names = {f"evoray_{s}" for s in skills.GENERATORS}
    assert names <= set(tm.all_tasks)
    loaded = tm.load(sorted(names))["tasks"]
    assert {k: len(list(v.validation_docs())) for k, v in loaded.items()} == {
        n: skills.SPLIT_SIZES["dev"] for n in names
    }
    path = small_lm_zoo.experts["arithmetic"]
    model = LlamaForCausalLM.from_pretrained(path)
    tok = make_lm_tokenizer()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=32, device="cpu")
    out = lm_eval.simple_evaluate(
        model=lm, tasks=["evoray_arithmetic", "evoray_prose"], task_manager=tm, limit=32
    )["results"]
    # lm-eval's greedy exact match agrees with the zoo's own scorer on the same examples.
    mine = exact_match(model, tok, skills.skill_split("arithmetic", "test")[:32])
    assert out["evoray_arithmetic"]["exact_match,strip"] == pytest.approx(mine)
    assert 1.0 < out["evoray_prose"]["word_perplexity,none"] < len(tok)


def test_cli_zoo_build_kind_causal_lm_prints_the_folders(small_lm_zoo, monkeypatch, capsys):
    import evoray.models.lm_zoo as lm_zoo
    from evoray.cli import main

    calls = []

    def fake(root, spec, force=False):
        calls.append((root, spec, force))
        return small_lm_zoo

    monkeypatch.setattr(lm_zoo, "build_lm_zoo", fake)
    assert main(["zoo", "build", "--kind", "causal_lm", "--root", "R", "--seed", "2"]) == 0
    assert calls == [("R", LMZooSpec(seed=2), False)]
    out = capsys.readouterr().out
    assert f"base: {small_lm_zoo.base}" in out
    assert f"expert sort: {small_lm_zoo.experts['sort']}" in out
