"""Generated multi-domain classification tasks: the data behind the embedded model zoo.

One task (binary sentiment) in several domains, as in Evolver's setting: each domain has its own
topic words and its own sentiment cue words, so an expert fine-tuned on one domain is near chance
on the others, while a model that combines the experts' knowledge does well on all of them.
Out-of-domain (OOD) sets use unseen topic words and mix the cue words of two training domains:
only a model that holds several experts' knowledge solves them.

Everything is generated from a seed, offline, as ``datasets.DatasetDict`` objects with
``train``/``dev``/``test`` splits and ``text``/``label`` columns.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from datasets import Dataset, DatasetDict

LABELS = ("negative", "positive")
SPLIT_SIZES = {"train": 512, "dev": 128, "test": 256}
DOMAIN_NAMES = ("books", "movies", "food", "travel", "tech")
GENERAL = "general"  # the base model's own sentiment domain (generic cue words)
OOD_NAMES = ("sports", "music")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class Domain:
    """The words that make up one domain's sentences."""

    name: str
    topic: tuple[str, ...]
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    ood: bool = False


@dataclass(frozen=True)
class TaskSuite:
    """A seeded family of domains over one vocabulary."""

    seed: int = 0
    domains: tuple[Domain, ...] = ()
    ood: tuple[Domain, ...] = ()
    general: Domain | None = None
    filler: tuple[str, ...] = ()
    vocab: tuple[str, ...] = field(default=(), repr=False)

    def dataset(self, domain: str, sizes: dict[str, int] | None = None) -> DatasetDict:
        """Train/dev/test splits of one domain; splits are disjoint by construction of seeds."""
        dom = self.domain(domain)
        sizes = sizes or SPLIT_SIZES
        splits = {}
        for k, (split, n) in enumerate(sizes.items()):
            rng = random.Random(f"{self.seed}/{domain}/{split}/{k}")
            rows = [_sentence(rng, dom, self) for _ in range(n)]
            splits[split] = Dataset.from_dict(
                {"text": [r[0] for r in rows], "label": [r[1] for r in rows]}
            )
        return DatasetDict(splits)

    def domain(self, name: str) -> Domain:
        for d in (*self.domains, *self.ood, self.general):
            if d is not None and d.name == name:
                return d
        known = ", ".join(d.name for d in (*self.domains, *self.ood))
        raise KeyError(f"unknown domain {name!r}; known domains: {known}")

    @property
    def domain_names(self) -> list[str]:
        return [d.name for d in self.domains]

    @property
    def ood_names(self) -> list[str]:
        return [d.name for d in self.ood]

    def mixed_train(self, n_per_domain: int) -> Dataset:
        """Unlabelled-style text from every training domain, for pretraining the base."""
        texts: list[str] = []
        for d in self.domains:
            rng = random.Random(f"{self.seed}/{d.name}/pretrain")
            texts += [_sentence(rng, d, self)[0] for _ in range(n_per_domain)]
        random.Random(self.seed).shuffle(texts)
        return Dataset.from_dict({"text": texts})


def _sentence(rng: random.Random, dom: Domain, suite: TaskSuite) -> tuple[str, int]:
    """A sentence of topic and filler words with cue words whose majority gives the label."""
    label = rng.randrange(2)
    n_cues = rng.choice((1, 3))
    n_major = n_cues if n_cues == 1 else rng.choice((2, 3))
    major = dom.positive if label else dom.negative
    minor = dom.negative if label else dom.positive
    words = [rng.choice(major) for _ in range(n_major)]
    words += [rng.choice(minor) for _ in range(n_cues - n_major)]
    words += [rng.choice(dom.topic) for _ in range(rng.randint(2, 4))]
    words += [rng.choice(suite.filler) for _ in range(rng.randint(2, 5))]
    rng.shuffle(words)
    return " ".join(words), label


def make_suite(seed: int = 0, n_domains: int = 4, n_ood: int = 2) -> TaskSuite:
    """Build the domains: invented words, so no pretrained knowledge leaks in."""
    if not 2 <= n_domains <= len(DOMAIN_NAMES):
        raise ValueError(f"n_domains must be in 2..{len(DOMAIN_NAMES)}, got {n_domains}")
    if not 0 <= n_ood <= len(OOD_NAMES):
        raise ValueError(f"n_ood must be in 0..{len(OOD_NAMES)}, got {n_ood}")
    rng = random.Random(f"suite/{seed}")
    used: set[str] = set()

    def words(n: int) -> tuple[str, ...]:
        out = []
        while len(out) < n:
            w = "".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(3))
            if w not in used:
                used.add(w)
                out.append(w)
        return tuple(out)

    filler = words(24)
    general = Domain(GENERAL, words(8), words(6), words(6))
    domains = tuple(Domain(name, words(8), words(6), words(6)) for name in DOMAIN_NAMES[:n_domains])
    ood = []
    for i, name in enumerate(OOD_NAMES[:n_ood]):
        a, b = domains[i % n_domains], domains[(i + 1) % n_domains]
        ood.append(
            Domain(
                name,
                words(8),
                a.positive[:3] + b.positive[:3],
                a.negative[:3] + b.negative[:3],
                True,
            )
        )
    vocab = tuple(sorted(used))
    return TaskSuite(seed, domains, tuple(ood), general, filler, vocab)
