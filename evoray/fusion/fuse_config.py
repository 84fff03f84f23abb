"""The ``evoray fuse`` config: parsed and checked before any model is built.

Every section is a frozen dataclass whose fields are the allowed keys; an unknown key, a wrong
type or an out-of-range value is a ``ConfigError`` naming the file and the dotted field
(``fusellm.yaml: fusion.lam must be in [0, 1], got 1.5``), as for ``evoray run`` configs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path, PureWindowsPath
from typing import Any

from evoray.config.reading import check_keys, read_yaml
from evoray.errors import ConfigError
from evoray.fusion.align import TEACHER_POSITIONS, VOCAB_FALLBACKS
from evoray.fusion.corpus import ARCHITECTURES, DOMAINS
from evoray.fusion.teacher_build import CE_UNITS
from evoray.fusion.teacher_build import METHODS as FUSERS
from evoray.fusion.train import PRECISIONS

TOKENIZERS = ("char", "bpe", "bytelevel")
METHODS = tuple(FUSERS)
KINDS = ("ce", "kl")
DEVICES = ("auto", "cpu", "cuda")
DATA_PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class CorpusSpec:
    """Text files (``train`` + ``heldout``: .txt one text per line, .jsonl or .parquet with a
    ``text_field``), else the generated corpus (``evoray.fusion.corpus.make_corpus``).
    ``n_train``/``n_heldout``: how many texts (files: the first ones; default all of them;
    generated: 400 and 100).  ``domains`` (generated only, from ``corpus.DOMAINS``): a small
    mixed corpus, ``n_train`` texts split over the domains (default 90) and ``n_heldout`` held-out
    texts *per domain* (default 60)."""

    train: str | None = None
    heldout: str | None = None
    text_field: str = "text"
    n_train: int | None = None
    n_heldout: int | None = None
    seed: int = 0
    domains: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A source or the target: an existing HF folder (``path``) or one to build and train.
    ``domain`` (a built source): its tokenizer and training use ``texts`` generated sentences
    of that domain (default 2000; never held-out ones) instead of the fusion corpus: a source
    that knows more of its domain than the target will see."""

    name: str = ""
    path: str | None = None
    domain: str | None = None
    texts: int | None = None
    arch: str = "llama"
    tokenizer: str = "bpe"
    vocab_size: int = 200
    hidden: int = 48
    layers: int = 2
    steps: int = 200
    lr: float = 3e-3
    seed: int = 1


_TARGET_DEFAULTS = {"name": "target", "vocab_size": 120, "hidden": 32, "steps": 0, "seed": 0}


@dataclass(frozen=True)
class FusionSpec:
    """FuseLLM training: the same ``steps``/``lr``/``batch_size``/``seed`` drive the CLM
    baseline, so the two targets differ only in the objective."""

    method: str = "avg_ce"
    lam: float = 0.9
    kind: str = "ce"
    temperature: float = 1.0
    k: int = 10
    vocab_map: str = "edit_distance"
    positions: str = "same_next"
    ce_unit: str = "token"
    steps: int = 100
    lr: float = 3e-3
    batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    activation_checkpointing: bool = False
    min_vocab_share: float = 0.2
    min_weight: float = 0.0


@dataclass(frozen=True)
class ExtractionSpec:
    """Source top-k extraction: texts per Parquet shard (memory and resume granularity) and
    actors per source sharing its shards (e.g. one per GPU when GPUs outnumber sources)."""

    shard_size: int = 2048
    workers_per_source: int = 1


@dataclass(frozen=True)
class ResourcesSpec:
    """What each Ray task (a build, a source's extraction actor, a training worker) reserves;
    ``train_workers`` > 1 trains each target with that many data-parallel workers, ``ddp``
    (a full model and optimizer state per worker) or ``fsdp`` (both sharded over the workers)."""

    num_cpus: float = 1
    num_gpus: float = 0
    train_workers: int = 1
    data_parallel: str = "ddp"


@dataclass(frozen=True)
class FuseConfig:
    corpus: CorpusSpec = field(default_factory=CorpusSpec)
    build: bool = True
    use_ray: bool = False
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    extraction: ExtractionSpec = field(default_factory=ExtractionSpec)
    sources: tuple[ModelSpec, ...] = ()
    target: ModelSpec = field(default_factory=lambda: ModelSpec(**_TARGET_DEFAULTS))
    fusion: FusionSpec = field(default_factory=FusionSpec)
    output_dir: str = "runs/fusellm"
    source: str = "<config>"

    @classmethod
    def from_yaml(cls, path: str | Path) -> FuseConfig:
        return cls.from_dict(read_yaml(path, "fuse config"), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<config>") -> FuseConfig:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        top = [f.name for f in fields(cls) if f.name != "source"]
        check_keys(data, top, source, "")
        raw_sources = data.get("sources") or []
        if not isinstance(raw_sources, list) or not raw_sources:
            raise ConfigError(f"{source}: sources: list at least one source model")
        build = _typed(data.get("build", True), bool, source, "build")
        sources = tuple(
            _section(ModelSpec, raw, source, f"sources[{i}].", {"name": f"source_{i}"})
            for i, raw in enumerate(raw_sources)
        )
        for i, spec in enumerate(sources):
            _check_name(spec.name, source, f"sources[{i}].name")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ConfigError(f"{source}: sources: names must be distinct, got {names}")
        target = _section(ModelSpec, data.get("target"), source, "target.", _TARGET_DEFAULTS)
        for i, spec in enumerate(sources):
            _check_model(spec, build, source, f"sources[{i}]")
        _check_model(target, build, source, "target")
        fusion = _section(FusionSpec, data.get("fusion"), source, "fusion.")
        _check_fusion(fusion, source)
        corpus = _section(CorpusSpec, data.get("corpus"), source, "corpus.")
        for name in ("n_train", "n_heldout"):
            if getattr(corpus, name) is not None and getattr(corpus, name) < 1:
                raise ConfigError(f"{source}: corpus.{name} must be >= 1")
        if corpus.domains is not None:
            bad = [d for d in corpus.domains if d not in DOMAINS]
            if bad or not corpus.domains or corpus.train is not None:
                raise ConfigError(
                    f"{source}: corpus.domains: a non-empty list from {sorted(DOMAINS)} for the "
                    f"generated corpus (not with train/heldout files), got {list(corpus.domains)}"
                )
        if (corpus.train is None) != (corpus.heldout is None):
            raise ConfigError(
                f"{source}: corpus: give both train and heldout files (or neither, for the "
                "generated corpus)"
            )
        resources = _section(ResourcesSpec, data.get("resources"), source, "resources.")
        if resources.num_cpus < 0 or resources.num_gpus < 0:
            raise ConfigError(f"{source}: resources: num_cpus and num_gpus must be >= 0")
        if resources.train_workers < 1:
            raise ConfigError(f"{source}: resources.train_workers must be >= 1")
        if resources.data_parallel not in DATA_PARALLEL:
            raise ConfigError(
                f"{source}: resources.data_parallel must be one of {DATA_PARALLEL}, got "
                f"{resources.data_parallel!r}"
            )
        extraction = _section(ExtractionSpec, data.get("extraction"), source, "extraction.")
        if extraction.shard_size < 1 or extraction.workers_per_source < 1:
            raise ConfigError(
                f"{source}: extraction: shard_size and workers_per_source must be >= 1"
            )
        return cls(
            corpus=corpus,
            extraction=extraction,
            build=build,
            use_ray=_typed(data.get("use_ray", False), bool, source, "use_ray"),
            resources=resources,
            sources=sources,
            target=target,
            fusion=fusion,
            output_dir=_typed(data.get("output_dir", "runs/fusellm"), str, source, "output_dir"),
            source=source,
        )

    def check_data_parallel(self) -> None:
        """``resources.train_workers`` > 1 needs Ray and a batch that splits evenly (checked
        after command-line overrides, so not in ``from_dict``)."""
        workers = self.resources.train_workers
        if workers > 1 and not self.use_ray:
            raise ConfigError(
                f"{self.source}: resources.train_workers > 1 trains on Ray: set use_ray "
                "(or --use-ray)"
            )
        if self.fusion.batch_size % workers:
            raise ConfigError(
                f"{self.source}: fusion.batch_size {self.fusion.batch_size} must be a multiple "
                f"of resources.train_workers {workers}"
            )


def _typed(value: Any, kind: type, source: str, where: str) -> Any:
    """``value`` as ``kind``: ints are accepted for floats; bools are never numbers."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {where}: expected {kind.__name__}, got {value!r}")


def _section(cls, raw: Any, source: str, prefix: str, defaults: dict | None = None):
    """Build dataclass ``cls`` from mapping ``raw`` (None = all defaults), checking key names
    and value types against the field annotations."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')}: expected a mapping, got {raw!r}")
    allowed = [f.name for f in fields(cls)]
    check_keys(raw, allowed, source, prefix)
    values = {**(defaults or {}), **raw}
    kinds = {"int": int, "float": float, "str": str, "bool": bool}
    kinds.update({"str | None": str, "int | None": int})
    out = {}
    for f in fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if value is None and f.type.endswith("| None"):
            out[f.name] = None
            continue
        if f.type.startswith("tuple[str"):
            if not isinstance(value, list):
                raise ConfigError(f"{source}: {prefix}{f.name}: expected a list, got {value!r}")
            out[f.name] = tuple(_typed(v, str, source, prefix + f.name) for v in value)
            continue
        out[f.name] = _typed(value, kinds[f.type], source, prefix + f.name)
    return cls(**out)


def _check_name(name: str, source: str, where: str) -> None:
    """A source's name becomes a folder under ``output_dir``: one plain path component only
    (no separator, no '..', not absolute, not empty), so no config writes outside it."""
    bad = (
        not name.strip()
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or Path(name).is_absolute()
        or PureWindowsPath(name).drive != ""
    )
    if bad:
        raise ConfigError(
            f"{source}: {where}: {name!r} is not a plain folder name (it names the source's "
            "folder under output_dir: no '/', '\\' or '..', not absolute, not empty); use e.g. "
            "'bpe200'"
        )


def _check_model(spec: ModelSpec, build: bool, source: str, where: str) -> None:
    if spec.domain is not None and spec.domain not in DOMAINS:
        raise ConfigError(
            f"{source}: {where}.domain must be one of {sorted(DOMAINS)}, got {spec.domain!r}"
        )
    if spec.texts is not None and spec.texts < 1:
        raise ConfigError(f"{source}: {where}.texts must be >= 1, got {spec.texts}")
    if spec.path is None and not build:
        raise ConfigError(f"{source}: {where}: give a path (build is false)")
    if spec.path is not None:
        return
    if spec.arch not in ARCHITECTURES:
        raise ConfigError(
            f"{source}: {where}.arch must be one of {ARCHITECTURES}, got {spec.arch!r}"
        )
    if spec.tokenizer not in TOKENIZERS:
        raise ConfigError(
            f"{source}: {where}.tokenizer must be one of {TOKENIZERS}, got {spec.tokenizer!r}"
        )
    for name in ("vocab_size", "hidden", "layers"):
        if getattr(spec, name) < 1:
            raise ConfigError(f"{source}: {where}.{name} must be >= 1")
    if spec.hidden % 4:
        raise ConfigError(f"{source}: {where}.hidden must be a multiple of 4 (4 attention heads)")
    if spec.steps < 0 or spec.lr <= 0:
        raise ConfigError(f"{source}: {where}: steps must be >= 0 and lr > 0")


def _check_fusion(f: FusionSpec, source: str) -> None:
    choices = {"method": METHODS, "kind": KINDS, "device": DEVICES, "precision": PRECISIONS}
    choices.update(vocab_map=VOCAB_FALLBACKS, positions=TEACHER_POSITIONS, ce_unit=CE_UNITS)
    for name, allowed in choices.items():
        if getattr(f, name) not in allowed:
            raise ConfigError(
                f"{source}: fusion.{name} must be one of {allowed}, got {getattr(f, name)!r}"
            )
    if not 0.0 <= f.lam <= 1.0:
        raise ConfigError(f"{source}: fusion.lam must be in [0, 1], got {f.lam}")
    if f.temperature <= 0:
        raise ConfigError(f"{source}: fusion.temperature must be > 0, got {f.temperature}")
    for name in ("k", "steps", "batch_size"):
        if getattr(f, name) < 1:
            raise ConfigError(f"{source}: fusion.{name} must be >= 1, got {getattr(f, name)}")
    if f.lr <= 0:
        raise ConfigError(f"{source}: fusion.lr must be > 0, got {f.lr}")
    if not 0.0 <= f.min_weight <= 1.0:
        raise ConfigError(f"{source}: fusion.min_weight must be in [0, 1], got {f.min_weight}")
    if not 0.0 <= f.min_vocab_share <= 1.0:
        raise ConfigError(
            f"{source}: fusion.min_vocab_share must be in [0, 1], got {f.min_vocab_share}"
        )
