"""Material for FuseLLM runs: corpus files or a generated English-like corpus, tokenizers, tiny
LMs (all offline).

The corpus is templated sentences whose words depend on each other (animals have habitats and
habits), so a tiny model can learn something in a few hundred steps and models with different
tokenizers (characters, BPE of several sizes) learn different views of the same text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "bos_token": "<s>", "eos_token": "</s>"}

_ANIMALS = {
    "cat": ("house", "sleeps", "fish"),
    "dog": ("garden", "runs", "bone"),
    "bird": ("tree", "sings", "seed"),
    "fish": ("river", "swims", "worm"),
    "horse": ("field", "gallops", "apple"),
    "mouse": ("barn", "hides", "cheese"),
    "frog": ("pond", "jumps", "fly"),
    "bear": ("forest", "climbs", "honey"),
}
_ADJECTIVES = ["small", "big", "red", "old", "young", "happy", "quiet", "brown"]
_TIMES = ["every morning", "at night", "in the rain", "after lunch", "all day"]
_TEMPLATES = [
    "the {adj} {animal} {habit} in the {home} {time} .",
    "a {animal} likes to eat {food} in the {home} .",
    "the {animal} {habit} and eats the {food} .",
    "{time} the {adj} {animal} {habit} near the {home} .",
    "my {animal} is {adj} and {habit} {time} .",
]


def _sentence(rng: random.Random) -> str:
    animal = rng.choice(sorted(_ANIMALS))
    home, habit, food = _ANIMALS[animal]
    return rng.choice(_TEMPLATES).format(
        adj=rng.choice(_ADJECTIVES),
        animal=animal,
        home=home,
        habit=habit,
        food=food,
        time=rng.choice(_TIMES),
    )


def make_corpus(seed: int = 0, n_train: int = 400, n_heldout: int = 100) -> tuple[list, list]:
    """``(train, heldout)`` lists of sentences, deterministic in ``seed``; no sentence of the
    held-out list appears in the train list (as far as the templates allow distinct ones)."""
    if n_train < 0 or n_heldout < 0:
        raise ValueError(f"sizes must be >= 0, got {n_train}, {n_heldout}")
    rng = random.Random(seed)
    train = [_sentence(rng) for _ in range(n_train)]
    seen = set(train)
    heldout: list[str] = []
    for _ in range(50 * max(n_heldout, 1)):
        if len(heldout) == n_heldout:
            break
        s = _sentence(rng)
        if s not in seen:
            heldout.append(s)
            seen.add(s)
    while len(heldout) < n_heldout:  # the template space ran out: allow repeats
        heldout.append(_sentence(rng))
    return train, heldout


_DISHES = {
    "soup": ("carrots", "onions", "boil", "pot", "twenty"),
    "bread": ("flour", "yeast", "bake", "oven", "forty"),
    "salad": ("lettuce", "tomatoes", "toss", "bowl", "five"),
    "pancakes": ("eggs", "milk", "fry", "pan", "ten"),
    "curry": ("rice", "spices", "simmer", "pot", "thirty"),
    "pie": ("apples", "butter", "bake", "oven", "fifty"),
    "omelette": ("eggs", "cheese", "fry", "pan", "six"),
    "stew": ("beans", "potatoes", "simmer", "pot", "sixty"),
}
_COOKS = ["grandma", "the chef", "my brother", "the baker", "our neighbour", "a student"]
_MEALS = ["for lunch", "for dinner", "on sundays", "for a party", "in the morning"]
_KITCHEN = [
    "to make {dish} , {cook} mixes the {a} with the {b} and {verb}s it for {m} minutes .",
    "the {dish} needs {a} and {b} , and {cook} uses a {pot} {meal} .",
    "{cook} {verb}s the {a} in a {pot} , then adds the {b} for the {dish} .",
    "{meal} {cook} makes {dish} : {verb} {a} and {b} for {m} minutes in a {pot} .",
]
_PLACES = {
    "paris": ("france", "french", "seine", "bread"),
    "rome": ("italy", "italian", "tiber", "pasta"),
    "madrid": ("spain", "spanish", "manzanares", "ham"),
    "berlin": ("germany", "german", "spree", "sausages"),
    "lisbon": ("portugal", "portuguese", "tagus", "fish"),
    "vienna": ("austria", "german", "danube", "cake"),
    "warsaw": ("poland", "polish", "vistula", "dumplings"),
    "athens": ("greece", "greek", "kifisos", "olives"),
}
_SEASONS = ["in spring", "in summer", "in autumn", "in winter", "on holiday", "every year"]
_TRAVELLERS = ["my aunt", "the teacher", "we", "my friends", "the tourists", "our class"]
_PLACE_TEMPLATES = [
    "{who} say {city} is the capital of {country} , where people speak {lang} .",
    "{when} {who} visit {city} and walk along the {river} .",
    "in {city} {who} speak {lang} and eat {food} {when} .",
    "the {river} flows through {city} , the capital of {country} , and {who} love it .",
]


def _kitchen(rng: random.Random) -> str:
    dish = rng.choice(sorted(_DISHES))
    a, b, verb, pot, minutes = _DISHES[dish]
    return rng.choice(_KITCHEN).format(
        dish=dish,
        a=a,
        b=b,
        verb=verb,
        pot=pot,
        m=minutes,
        cook=rng.choice(_COOKS),
        meal=rng.choice(_MEALS),
    )


def _places(rng: random.Random) -> str:
    city = rng.choice(sorted(_PLACES))
    country, lang, river, food = _PLACES[city]
    return rng.choice(_PLACE_TEMPLATES).format(
        city=city,
        country=country,
        lang=lang,
        river=river,
        food=food,
        when=rng.choice(_SEASONS),
        who=rng.choice(_TRAVELLERS),
    )


DOMAINS = {"animals": _sentence, "kitchen": _kitchen, "places": _places}


def domain_texts(
    domain: str, n: int, seed: int = 0, exclude: Sequence[str] = (), distinct: bool = False
) -> list[str]:
    """``n`` generated sentences of ``domain`` (one of ``DOMAINS``), deterministic in ``seed``,
    none of them in ``exclude``; ``distinct``: no repeats (as far as the templates allow)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    rng = random.Random(f"{domain}-{seed}")
    make = DOMAINS[domain]
    seen, out = set(exclude), []
    for _ in range(50 * max(n, 1)):
        if len(out) == n:
            break
        s = make(rng)
        if s in seen:
            continue
        out.append(s)
        if distinct:
            seen.add(s)
    if len(out) < n:
        raise ValueError(f"domain {domain!r} cannot give {n} sentences outside those excluded")
    return out


def mixed_corpus(
    domains: Sequence[str], seed: int = 0, n_train: int = 90, n_heldout: int = 60
) -> tuple[list[str], dict[str, list[str]]]:
    """``(train, heldout per domain)``: ``n_train`` texts split evenly over ``domains`` and
    interleaved, ``n_heldout`` distinct held-out texts per domain, never in the train list."""
    heldout = {d: domain_texts(d, n_heldout, seed + 10_000, distinct=True) for d in domains}
    per, extra = divmod(n_train, len(domains))
    parts = [
        domain_texts(d, per + (i < extra), seed, exclude=heldout[d]) for i, d in enumerate(domains)
    ]
    train = [p[j] for j in range(per + 1) for p in parts if j < len(p)]
    return train, heldout


def source_texts(domain: str, n: int, seed: int, heldout: Sequence[str]) -> list[str]:
    """A source's own training text: ``n`` sentences of its domain from a seed of its own
    (more, and other, text than the target sees), none of them held out."""
    return domain_texts(domain, n, seed + 20_000, exclude=heldout)


TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def read_texts(path: str | Path, text_field: str = "text", limit: int | None = None) -> list[str]:
    """Texts of a corpus file, in order (at most ``limit``): ``.txt`` one text per non-empty
    line, ``.jsonl`` one JSON object per line with ``text_field``, ``.parquet`` the column
    ``text_field``.  Errors name the file, the line or column, and what to do."""
    import json

    from evoray.fusion import FusionError

    path = Path(path)
    if path.suffix not in TEXT_SUFFIXES:
        raise FusionError(f"corpus file {path}: use one of {', '.join(TEXT_SUFFIXES)}")
    if not path.is_file():
        raise FusionError(f"corpus file {path} not found")
    texts: list[str] = []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        if text_field not in names:
            raise FusionError(
                f"corpus file {path} has no column {text_field!r} (columns: {', '.join(names)}); "
                "set corpus.text_field"
            )
        texts = [t for t in pq.read_table(path, columns=[text_field]).column(0).to_pylist() if t]
    else:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if limit is not None and len(texts) >= limit:
                    break
                if not line.strip():
                    continue
                if path.suffix == ".txt":
                    texts.append(line.rstrip("\r\n"))
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise FusionError(
                        f"corpus file {path}, line {n}: expected a JSON object with a string "
                        f"{text_field!r} field ({type(exc).__name__}: {exc}); set "
                        "corpus.text_field for another field name"
                    ) from None
                if not isinstance(text, str):
                    raise FusionError(
                        f"corpus file {path}, line {n}: {text_field!r} is not a string"
                    )
                if text:
                    texts.append(text)
    texts = texts[:limit] if limit is not None else texts
    if not texts:
        raise FusionError(f"corpus file {path} holds no non-empty texts")
    return texts


def load_corpus(spec) -> tuple[list[str], list[str]]:
    """``(train, heldout)`` for a ``CorpusSpec``: its files, else the generated corpus (mixed
    from ``spec.domains`` when given: held-out texts of every domain, concatenated)."""
    if spec.train is not None:
        return (
            read_texts(spec.train, spec.text_field, spec.n_train),
            read_texts(spec.heldout, spec.text_field, spec.n_heldout),
        )
    if spec.domains:
        train, heldout = mixed_corpus(
            spec.domains,
            spec.seed,
            90 if spec.n_train is None else spec.n_train,
            60 if spec.n_heldout is None else spec.n_heldout,
        )
        return train, [t for d in spec.domains for t in heldout[d]]
    n_train = 400 if spec.n_train is None else spec.n_train
    return make_corpus(spec.seed, n_train, 100 if spec.n_heldout is None else spec.n_heldout)


def _wrap(backend):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=512, **SPECIALS)


def build_char_tokenizer(texts: Sequence[str]):
    """A character-level ``PreTrainedTokenizerFast`` over the characters of ``texts`` (space
    included) with the ``SPECIALS`` tokens; no post-processor (callers add bos/eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = sorted({c for t in texts for c in t})
    specials = list(SPECIALS.values())
    vocab = {t: i for i, t in enumerate(specials + [c for c in chars if c not in specials])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIALS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return _wrap(backend)


def build_bpe_tokenizer(texts: Sequence[str], vocab_size: int):
    """A BPE ``PreTrainedTokenizerFast`` (Metaspace '▁' word markers) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS.values()), show_progress=False
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return _wrap(backend)


def build_bytelevel_tokenizer(texts: Sequence[str], vocab_size: int):
    """A GPT-2 style byte-level BPE (``'Ġ'`` word markers) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return _wrap(backend)


ARCHITECTURES = ("llama", "gpt2")


def make_tiny_lm(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, arch: str = "llama"):
    """A randomly initialised small causal LM (``LlamaForCausalLM`` or ``GPT2LMHeadModel``)
    sized to ``tokenizer``'s vocab."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if arch == "gpt2":
        gpt2 = GPT2Config(
            vocab_size=len(tokenizer),
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        torch.manual_seed(seed)
        return GPT2LMHeadModel(gpt2)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
