"""One-shot merges of the causal-LM zoo, scored directly: the baselines of the README's LM table.

Builds (or reuses) the zoo, merges its experts with `evoray merge`'s own code (average, task
arithmetic, TIES) and prints, per model, test exact match of greedy answers on each skill, the
answer perplexity on the skills, and perplexity on held-out prose. Run from the repository root:

    python examples/lm_zoo_baselines.py [--root DIR]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from evoray.config.merge_config import MergeConfig
from evoray.merge.streaming import merge_to_folder
from evoray.models.lm_zoo import build_lm_zoo, exact_match, make_lm_tokenizer
from evoray.tasks import skills


@torch.no_grad()
def perplexity(model, tok, records: list[dict]) -> float:
    """exp of the mean token NLL: of answer + </s> after the prompt (qa), of the text (text)."""
    nll, count = 0.0, 0
    for r in records:
        ids = tok(skills.qa_text(r), return_tensors="pt")["input_ids"]
        skip = len(tok(r["prompt"])["input_ids"]) if "prompt" in r else 1
        labels = ids.clone()
        labels[:, :skip] = -100
        n = int((labels[:, 1:] != -100).sum())
        nll += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    return math.exp(nll / count)


def score(path: Path, tok) -> dict[str, float]:
    model = LlamaForCausalLM.from_pretrained(path).eval()
    test = {s: skills.skill_split(s, "test") for s in skills.GENERATORS}
    ind = [exact_match(model, tok, test[s]) for s in skills.EXPERT_SKILLS]
    return {
        "in_em": sum(ind) / len(ind),
        # geometric mean over skills: one skill's huge perplexity would swamp an arithmetic one
        "in_ppl": math.exp(
            sum(math.log(perplexity(model, tok, test[s])) for s in skills.EXPERT_SKILLS) / len(ind)
        ),
        "copy_em": exact_match(model, tok, test["copy"]),
        "prose_ppl": perplexity(model, tok, test["prose"]),
        **{s: e for s, e in zip(skills.EXPERT_SKILLS, ind, strict=True)},
    }


def merged(zoo, method: str, params: dict, out: Path) -> Path:
    config = {
        "merge_method": method,
        "base_model": str(zoo.base),
        "models": [{"model": str(p), "parameters": params} for p in zoo.experts.values()],
    }
    if method == "linear":
        config.pop("base_model")
    return merge_to_folder(MergeConfig.from_dict(config), out / method, overwrite=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = build_lm_zoo(args.root)
    tok = make_lm_tokenizer(zoo.spec.seed)
    rows = {"base": zoo.base, **{f"expert {k}": v for k, v in zoo.experts.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rows["average (linear)"] = merged(zoo, "linear", {"weight": 1.0}, out)
        for lam in (0.5, 1.0):
            rows[f"task arithmetic, weight {lam}"] = merged(
                zoo, "task_arithmetic", {"weight": lam}, out / f"ta{lam}"
            )
        rows["TIES, weight 1, density 0.5"] = merged(
            zoo, "ties", {"weight": 1.0, "density": 0.5}, out
        )
        cols = ["in_em", *skills.EXPERT_SKILLS, "in_ppl", "copy_em", "prose_ppl"]
        print("| model | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for name, path in rows.items():
            s = score(path, tok)
            print(f"| {name} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
