"""Merge the embedded zoo's domain experts with every merge method and compare them.

    python examples/merge_demo.py [--out runs/merge-demo]

Builds (or reuses) the zoo, writes one mergekit-format YAML per method next to its merged model,
runs each through ``evoray merge``'s code path, and prints test accuracy per domain, the
in-domain mean and the out-of-domain (OOD) mean.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import yaml
from transformers import AutoTokenizer, BertForSequenceClassification
from transformers.utils import logging as hf_logging

from evoray.config.merge_config import MergeConfig
from evoray.merge.streaming import merge_to_folder
from evoray.models.zoo import build_zoo
from evoray.tasks.evaluation import classification_scores, encode


def recipes(base: str, experts: list[str]) -> dict[str, dict]:
    """One config per method, with the settings a user would start from."""

    def models(**params):
        return [{"model": e, "parameters": dict(params)} for e in experts]

    return {
        "linear (average)": {"merge_method": "linear", "models": models(weight=1.0)},
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": models(weight=0.4),
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": models(weight=1.0, density=0.5),  # normalize: true (mergekit's default)
        },
        "dare_ties": {
            "merge_method": "dare_ties",
            "base_model": base,
            "models": models(weight=0.4, density=0.5),
        },
        "dare_linear": {
            "merge_method": "dare_linear",
            "base_model": base,
            "models": models(weight=0.4, density=0.5),
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": models(weight=0.4, density=0.8, gamma=0.02),
        },
        "model_stock": {"merge_method": "model_stock", "base_model": base, "models": models()},
        "slerp (first two)": {
            "merge_method": "slerp",
            "base_model": experts[0],
            "models": [{"model": experts[0]}, {"model": experts[1]}],
            "parameters": {"t": 0.5},
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/merge-demo"))
    parser.add_argument("--zoo-root", type=Path, default=None, help="default: $EVORAY_HOME/zoo")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    zoo = build_zoo(args.zoo_root)
    suite = zoo.suite
    tok = AutoTokenizer.from_pretrained(zoo.base)
    columns = [*suite.domain_names, *suite.ood_names]
    tests = {d: encode(tok, suite.dataset(d)["test"]) for d in columns}

    def score(folder: Path) -> list[float]:
        model = BertForSequenceClassification.from_pretrained(folder)
        return [classification_scores(model, tests[d])["accuracy"] for d in columns]

    rows: list[tuple[str, list[float], float]] = [("base", score(zoo.base), 0.0)]
    rows += [(f"expert {d}", score(p), 0.0) for d, p in zoo.experts.items()]
    args.out.mkdir(parents=True, exist_ok=True)
    for label, recipe in recipes(str(zoo.base), [str(p) for p in zoo.experts.values()]).items():
        slug = label.split(" ")[0]
        cfg_path = args.out / f"{slug}.yml"
        cfg_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        t0 = time.perf_counter()
        out = merge_to_folder(MergeConfig.from_yaml(cfg_path), args.out / slug, overwrite=True)
        rows.append((label, score(out), time.perf_counter() - t0))

    n_in = len(suite.domain_names)
    head = f"{'model':<20}" + "".join(f"{c:>8}" for c in columns) + f"{'in-dom':>8}{'OOD':>8}"
    lines = [
        "test accuracy per domain (in-domain: "
        + ", ".join(suite.domain_names)
        + "; OOD: "
        + ", ".join(suite.ood_names)
        + ")",
        head,
        "-" * len(head),
    ]
    for label, accs, _ in rows:
        in_dom = sum(accs[:n_in]) / n_in
        ood = sum(accs[n_in:]) / max(1, len(accs) - n_in)
        lines.append(
            f"{label:<20}" + "".join(f"{a:8.3f}" for a in accs) + f"{in_dom:8.3f}{ood:8.3f}"
        )
    table = "\n".join(lines)
    print(table)
    (args.out / "results.txt").write_text(table + "\n")
    print(f"\nconfigs, merged models and results.txt are in {args.out}/")


if __name__ == "__main__":
    main()
