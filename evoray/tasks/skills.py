"""Generated language-model skills: the data behind the embedded causal-LM zoo.

Each skill is a prompt/answer format over a small whitespace-separated vocabulary, so a tiny
word-level Llama can learn it in seconds on a CPU and exact match of its greedy answer is
meaningful. The four expert skills (``arithmetic``, ``reverse``, ``sort``, ``colors``) are
what the experts are fine-tuned on; the base model is pretrained on generic ``prose`` and on
``copy`` only. The OOD sets are the skills no expert is trained on: ``copy`` (does a merge keep
the base's own skill?) and held-out ``prose`` (perplexity: does it stay a language model?).

Everything is generated from a seed, offline, as lists of ``{"prompt", "answer"}`` (qa) or
``{"text"}`` (text) records; ``write_skill_files`` saves them as ``.jsonl`` task files.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
DIGITS = tuple("0123456789")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
COLORS = ("red", "blue", "green", "yellow", "black", "white")
EXPERT_SKILLS = ("arithmetic", "reverse", "sort", "colors")
OOD_QA = ("copy",)
OOD_TEXT = ("prose",)
SPLIT_SIZES = {"train": 768, "dev": 96, "test": 96}
N_OBJECTS = 36  # invented words whose colour the ``colors`` expert memorises

_NOUNS = [
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "house",
    "river",
    "stone",
    "child",
    "farmer",
    "king",
    "road",
    "ship",
    "song",
]
_VERBS = ["sees", "finds", "likes", "takes", "holds", "makes", "wants", "builds", "moves", "keeps"]
_ADJS = ["big", "small", "old", "new", "quiet", "happy", "dark", "bright", "warm", "cold"]
_FILL = ["the", "a", "and", "then", "it", "is", "was", "near", "under", "with"]
KEYWORDS = ("add", "reverse", "sort", "copy", "color", "of", "=", "+", ".")


def object_words(seed: int) -> tuple[str, ...]:
    """The invented object names of the ``colors`` skill (pronounceable, not English)."""
    rng = random.Random(f"objects-{seed}")
    cons, vow = "bdfgklmnprstvz", "aeiou"
    words: set[str] = set()
    while len(words) < N_OBJECTS:
        words.add("".join(rng.choice(cons) + rng.choice(vow) for _ in range(2)) + rng.choice(cons))
    return tuple(sorted(words))


def object_colors(seed: int) -> dict[str, str]:
    """Which colour each invented object has (the facts the ``colors`` expert learns)."""
    rng = random.Random(f"colors-{seed}")
    return {w: rng.choice(COLORS) for w in object_words(seed)}


def vocabulary(seed: int) -> tuple[str, ...]:
    """Every token any skill uses (the word-level tokenizer's vocabulary, specials first)."""
    words = (*DIGITS, *LETTERS, *KEYWORDS, *COLORS, *_NOUNS, *_VERBS, *_ADJS, *_FILL)
    words = (*words, *object_words(seed))
    return (*SPECIAL_TOKENS, *dict.fromkeys(words))


def _arithmetic(rng: random.Random, seed: int) -> dict[str, str]:
    a, b = rng.randrange(10), rng.randrange(10)
    return {"prompt": f"add {a} + {b} =", "answer": " ".join(str(a + b))}


def _letters(rng: random.Random) -> list[str]:
    return rng.sample(LETTERS, rng.randint(3, 5))


def _reverse(rng: random.Random, seed: int) -> dict[str, str]:
    w = _letters(rng)
    return {"prompt": f"reverse {' '.join(w)} =", "answer": " ".join(reversed(w))}


def _sort(rng: random.Random, seed: int) -> dict[str, str]:
    d = [rng.choice(DIGITS) for _ in range(rng.randint(3, 5))]
    return {"prompt": f"sort {' '.join(d)} =", "answer": " ".join(sorted(d))}


def _colors(rng: random.Random, seed: int) -> dict[str, str]:
    facts = object_colors(seed)
    w = rng.choice(sorted(facts))
    return {"prompt": f"color of {w} =", "answer": facts[w]}


def _copy(rng: random.Random, seed: int) -> dict[str, str]:
    pool = DIGITS + LETTERS
    w = [rng.choice(pool) for _ in range(rng.randint(3, 5))]
    return {"prompt": f"copy {' '.join(w)} =", "answer": " ".join(w)}


def _prose(rng: random.Random, seed: int) -> dict[str, str]:
    def clause() -> str:
        return (
            f"{rng.choice(('the', 'a'))} {rng.choice(_ADJS)} {rng.choice(_NOUNS)} "
            f"{rng.choice(_VERBS)} {rng.choice(('the', 'a'))} {rng.choice(_NOUNS)}"
        )

    parts = [clause()]
    for _ in range(rng.randint(0, 2)):
        parts.append(f"{rng.choice(('and then', 'near', 'with'))} {clause()}")
    return {"text": " ".join(parts) + " ."}


GENERATORS: dict[str, Callable[[random.Random, int], dict[str, str]]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort": _sort,
    "colors": _colors,
    "copy": _copy,
    "prose": _prose,
}


def skill_kind(name: str) -> str:
    """``text`` for the prose corpus, ``qa`` for the prompt/answer skills."""
    return "text" if name in OOD_TEXT else "qa"


def skill_split(name: str, split: str, seed: int = 0, n: int | None = None) -> list[dict]:
    """``n`` records (default ``SPLIT_SIZES[split]``) of one skill's split, deterministic.

    Splits draw from independent streams; the small skills (single-digit additions, 36 colour
    facts) repeat facts across splits by design, the larger ones rarely do."""
    if name not in GENERATORS:
        raise KeyError(f"unknown skill {name!r}; known: {sorted(GENERATORS)}")
    rng = random.Random(f"{name}-{split}-{seed}")
    count = SPLIT_SIZES[split] if n is None else n
    return [GENERATORS[name](rng, seed) for _ in range(count)]


def qa_text(record: dict[str, str], eos: str = "</s>") -> str:
    """One training line: prompt, answer and end-of-sequence (what greedy decoding stops at)."""
    if "text" in record:
        return f"{record['text']} {eos}"
    return f"{record['prompt']} {record['answer']} {eos}"


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)


def write_skill_files(folder: Path, seed: int = 0) -> dict[str, dict[str, Path]]:
    """Every skill's train/dev/test as ``folder/<skill>/<split>.jsonl``; returns the paths."""
    out: dict[str, dict[str, Path]] = {}
    for name in GENERATORS:
        out[name] = {}
        for split in SPLIT_SIZES:
            path = Path(folder) / name / f"{split}.jsonl"
            write_jsonl(path, skill_split(name, split, seed))
            out[name][split] = path
    return out


def task_entries(files: dict[str, dict[str, Path]]) -> list[dict]:
    """The ``tasks:`` list (contract format) scoring the zoo's skills from ``files``:
    the expert skills in the fitness (exact match), ``copy`` and ``prose`` as OOD."""
    entries = []
    for name, paths in files.items():
        kind = skill_kind(name)
        entry: dict = {
            "name": name,
            "kind": kind,
            "weight": 1.0,
            "ood": name not in EXPERT_SKILLS,
            "data": {split: str(p) for split, p in paths.items()},
        }
        if kind == "qa":
            entry["metric"] = "exact_match"
            entry["fields"] = {"prompt": "prompt", "answer": "answer"}
        else:
            entry["fields"] = {"text": "text"}
        entries.append(entry)
    return entries


def write_lm_eval_data(folder: Path, seed: int = 0) -> None:
    """The dev/test files the shipped lm-eval task YAMLs read (``<folder>/<skill>/``)."""
    for name in GENERATORS:
        for split in ("dev", "test"):
            write_jsonl(Path(folder) / name / f"{split}.jsonl", skill_split(name, split, seed))


if __name__ == "__main__":
    import sys

    # python -m evoray.tasks.skills search_spaces/lm_eval_tasks/data
    write_lm_eval_data(Path(sys.argv[1]))
