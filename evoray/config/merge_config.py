"""Merge configs in mergekit's YAML format.

Users arrive with mergekit configs, so we read that format as is (``merge_method``, ``base_model``,
``models[].parameters``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``) and
evaluate parameters exactly as mergekit does: a number, a gradient (a list of numbers interpolated
over the layers), or a list of ``{filter, value}`` conditions matched against the tensor name.
``slices:`` is read when it is a whole-model merge written as slices (what mergekit-evolve and many
published configs write): every source of a slice spans the same layers, and the slices cover the
layers in order, each with its own parameters. Stacking different layers (a frankenmerge) is not.
Anything we do not implement is an error, never silently ignored (mergekit itself ignores
unknown top-level keys, which hides typos such as ``paramters``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from evoray.config.reading import read_yaml, unknown_key
from evoray.errors import ConfigError
from evoray.weights.layers import before_blocks, layer_index, tensor_position

SUPPORTED_KEYS = {
    "merge_method": "the merge method name, e.g. ties",
    "base_model": "the model the task vectors are taken from",
    "models": "the models to merge, each {model: ..., parameters: {...}}",
    "parameters": "global parameters (defaults for every model)",
    "dtype": "dtype the inputs are rounded to before merging",
    "out_dtype": "dtype of the saved model (default: dtype, else the base model's)",
    "tokenizer_source": "'base' or a model whose tokenizer is copied",
    "chat_template": "a chat template string stored in the tokenizer config",
    "name": "a name for the merged model (used in its model card)",
    "slices": "instead of models: consecutive layer ranges, each merging the same models "
    "(sources: [{model, layer_range, parameters}], parameters)",
}
# Keys mergekit knows that evoray does not implement; each gets its own explanation.
UNSUPPORTED_KEYS = {
    "modules": "multi-module merges are not supported; list whole models under 'models'",
    "tokenizer": "the 'tokenizer' block (added tokens, embedding permutation) is not supported; "
    "use tokenizer_source: base or a model reference",
}
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

Setting = Any  # number | bool | str | list[number] | list[{filter, value}] | {filter, value}


def parse_dtype(value: str | None, *, field_name: str) -> torch.dtype | None:
    """Map a config dtype string to torch, naming the field on error."""
    if value is None:
        return None
    try:
        return DTYPES[str(value).lower()]
    except KeyError:
        raise ConfigError(
            f"{field_name}: unknown dtype {value!r}; use one of float32, float16, bfloat16"
        ) from None


def evaluate_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """Value of one parameter setting for one tensor at layer position ``t`` in [0, 1].

    Mirrors mergekit's ``evaluate_setting``: a numeric list is a gradient interpolated linearly
    over ``t``; a list of non-numeric scalars is indexed; a list of conditions returns the first
    whose ``filter`` is missing, ``*``, or a substring of the tensor name (None if none match).
    """
    if isinstance(setting, bool | int | float | str):
        return setting
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(e, int | float) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if setting and all(isinstance(e, bool | int | float | str) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
                return evaluate_setting(cond["value"], tensor_name, t)
        return None
    raise ConfigError(f"unexpected parameter value {setting!r}")


def _check_setting(setting: Setting, where: str) -> None:
    """Reject malformed settings at load time so errors name the config field, not a tensor."""
    if isinstance(setting, bool | int | float | str):
        if isinstance(setting, float) and not math.isfinite(setting):
            raise ConfigError(f"{where}: value must be finite, got {setting}")
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(e, bool | int | float | str) for e in setting):
            for e in setting:
                _check_setting(e, where)
            return
        for i, cond in enumerate(setting):
            if not isinstance(cond, Mapping) or "value" not in cond:
                raise ConfigError(
                    f"{where}[{i}]: expected a number, a list of numbers (gradient) or "
                    f"{{filter: ..., value: ...}} conditions, got {cond!r}"
                )
            extra = set(cond) - {"filter", "value"}
            if extra:
                raise ConfigError(f"{where}[{i}]: unknown keys {sorted(extra)}; use filter, value")
            _check_setting(cond["value"], f"{where}[{i}].value")
        return
    raise ConfigError(
        f"{where}: expected a number, a list of numbers (gradient) or {{filter, value}} "
        f"conditions, got {setting!r}"
    )


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ``models:``: a model reference and its own parameters."""

    model: str
    parameters: dict[str, Setting] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSpec:
    """One entry of ``slices:``: layers ``[start, end)`` of every source merged with this
    slice's parameters (``sources[].parameters`` per model, ``parameters`` for all)."""

    start: int
    end: int
    sources: tuple[ModelSpec, ...]
    parameters: dict[str, Setting] = field(default_factory=dict)

    def source(self, model: str) -> ModelSpec | None:
        return next((s for s in self.sources if s.model == model), None)


@dataclass(frozen=True)
class MergeConfig:
    """A validated mergekit-style merge config."""

    merge_method: str
    models: tuple[ModelSpec, ...]
    base_model: str | None = None
    parameters: dict[str, Setting] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None
    name: str | None = None
    source: str = "<config>"
    raw: dict[str, Any] = field(default_factory=dict, compare=False)
    # From ``slices:`` (empty for ``models:``): then ``models`` lists each source once, with
    # no parameters of its own, and the parameters come from the slice of each tensor.
    slices: tuple[SliceSpec, ...] = ()

    @classmethod
    def from_yaml(cls, path: str | Path) -> MergeConfig:
        """Read and validate a YAML config; relative model paths resolve against its folder."""
        path = Path(path)
        data = read_yaml(path, "config file")
        return cls.from_dict(data, source=str(path), root=path.parent)

    @classmethod
    def from_dict(
        cls, data: Any, *, source: str = "<config>", root: Path | None = None
    ) -> MergeConfig:
        """Validate a parsed config; every error names ``source`` and the offending field."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {data!r}")
        for key in data:
            if key in UNSUPPORTED_KEYS:
                raise ConfigError(f"{source}: '{key}': {UNSUPPORTED_KEYS[key]}")
            if key not in SUPPORTED_KEYS:
                raise unknown_key(key, SUPPORTED_KEYS, f"{source}: unknown key '{key}'")
        if "merge_method" not in data:
            raise ConfigError(f"{source}: 'merge_method' is required")
        method = str(data["merge_method"])

        def ref(value: Any, where: str) -> str:
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{source}: {where}: expected a model path or hub id string")
            return _resolve_ref(value, root)

        slices: tuple[SliceSpec, ...] = ()
        if "slices" in data:
            if "models" in data:
                raise ConfigError(
                    f"{source}: give either 'models' or 'slices', not both (as in mergekit)"
                )
            slices = _parse_slices(data["slices"], source, ref)
            models_raw = [{"model": s.model} for s in slices[0].sources]
        else:
            models_raw = data.get("models")
        if not isinstance(models_raw, list) or not models_raw:
            raise ConfigError(f"{source}: 'models' must be a non-empty list of {{model: ...}}")
        models = []
        for i, entry in enumerate(models_raw):
            where = f"models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, Mapping) or "model" not in entry:
                raise ConfigError(f"{source}: {where}: expected {{model: ..., parameters: ...}}")
            extra = set(entry) - {"model", "parameters"}
            if extra:
                raise ConfigError(
                    f"{source}: {where}: unknown keys {sorted(extra)}; use model, parameters"
                )
            params = _check_parameters(entry.get("parameters"), f"{source}: {where}.parameters")
            model = entry["model"] if slices else ref(entry["model"], f"{where}.model")
            models.append(ModelSpec(model, params))
        base = data.get("base_model")
        tok = data.get("tokenizer_source")
        if tok == "union":
            raise ConfigError(
                f"{source}: tokenizer_source: 'union' (merging vocabularies) is not supported; "
                "use 'base' or a model reference"
            )
        return cls(
            merge_method=method,
            models=tuple(models),
            base_model=ref(base, "base_model") if base is not None else None,
            parameters=_check_parameters(data.get("parameters"), f"{source}: parameters"),
            dtype=parse_dtype(data.get("dtype"), field_name=f"{source}: dtype"),
            out_dtype=parse_dtype(data.get("out_dtype"), field_name=f"{source}: out_dtype"),
            tokenizer_source=(
                None if tok is None else tok if tok == "base" else ref(tok, "tokenizer_source")
            ),
            chat_template=data.get("chat_template"),
            name=data.get("name"),
            source=source,
            raw=dict(data),
            slices=slices,
        )

    def locate(self, tensor_name: str, n_layers: int) -> tuple[float, int | None]:
        """Gradient position ``t`` of a tensor and the index of its slice (None without
        ``slices``), as mergekit's planner assigns them: a block at its position within its
        slice (``(i - start) / (len - 1)``, 1 for a one-layer slice); the tensors before the
        blocks take the first slice's parameters, those after them the last slice's, at t=0."""
        if not self.slices:
            return tensor_position(tensor_name, n_layers), None
        idx = layer_index(tensor_name)
        if idx is None:
            return 0.0, 0 if before_blocks(tensor_name) else len(self.slices) - 1
        for k, sl in enumerate(self.slices):
            if sl.start <= idx < sl.end:
                n = sl.end - sl.start
                return ((idx - sl.start) / (n - 1) if n > 1 else 1.0), k
        raise ConfigError(f"{self.source}: no slice holds layer {idx} ({tensor_name})")

    def check_slices_cover(self, n_layers: int) -> None:
        """The slices must end at the models' last layer: a partial stack is a frankenmerge."""
        if self.slices and self.slices[-1].end != n_layers:
            raise ConfigError(
                f"{self.source}: slices cover layers 0-{self.slices[-1].end} but the models have "
                f"{n_layers} layers; evoray merges whole models, so the slices' layer_range must "
                f"run from 0 to {n_layers} (dropping or stacking layers is a frankenmerge, "
                "which is not supported)"
            )

    def model_parameter(
        self,
        name: str,
        model_index: int,
        tensor_name: str,
        t: float,
        *,
        fallback: bool = True,
        slice_index: int | None = None,
    ) -> Any:
        """Resolve a parameter for one model and tensor: the model's own (in ``slices``, its
        source's in slice ``slice_index``), then (with ``fallback``) the slice's and the global
        one, as mergekit does."""
        sources = [self.models[model_index].parameters]
        if slice_index is not None:
            src = self.slices[slice_index].source(self.models[model_index].model)
            sources = [src.parameters if src is not None else {}]
        if fallback:
            if slice_index is not None:
                sources.append(self.slices[slice_index].parameters)
            sources.append(self.parameters)
        for settings in sources:
            if name in settings:
                value = evaluate_setting(settings[name], tensor_name, t)
                if value is not None:
                    return value
        return None

    def global_parameter(
        self, name: str, tensor_name: str, t: float, *, slice_index: int | None = None
    ) -> Any:
        """Resolve a global parameter for one tensor (a slice's own value first)."""
        if slice_index is not None and name in self.slices[slice_index].parameters:
            value = evaluate_setting(self.slices[slice_index].parameters[name], tensor_name, t)
            if value is not None:
                return value
        if name in self.parameters:
            return evaluate_setting(self.parameters[name], tensor_name, t)
        return None

    def to_yaml(self) -> str:
        """The config as the user wrote it, for the model card."""
        return yaml.safe_dump(self.raw, sort_keys=False).rstrip()


def _parse_slices(data: Any, source: str, ref: Any) -> tuple[SliceSpec, ...]:
    """Validate ``slices:``; only whole-model merges written as slices are accepted."""
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{source}: 'slices' must be a non-empty list of {{sources: [...]}}")
    out: list[SliceSpec] = []
    for i, sl in enumerate(data):
        where = f"slices[{i}]"
        if not isinstance(sl, Mapping) or "sources" not in sl:
            raise ConfigError(f"{source}: {where}: expected {{sources: [...], parameters: ...}}")
        extra = set(sl) - {"sources", "parameters"}
        if extra:
            raise ConfigError(
                f"{source}: {where}: unsupported keys {sorted(extra)}; evoray reads sources and "
                "parameters of a slice"
            )
        raw_sources = sl["sources"]
        if not isinstance(raw_sources, list) or not raw_sources:
            raise ConfigError(f"{source}: {where}.sources must be a non-empty list")
        sources: list[ModelSpec] = []
        span: tuple[int, int] | None = None
        for j, src in enumerate(raw_sources):
            at = f"{where}.sources[{j}]"
            if not isinstance(src, Mapping) or "model" not in src:
                raise ConfigError(f"{source}: {at}: expected {{model, layer_range, parameters}}")
            extra = set(src) - {"model", "layer_range", "parameters"}
            if extra:
                raise ConfigError(
                    f"{source}: {at}: unknown keys {sorted(extra)}; use model, layer_range, "
                    "parameters"
                )
            rng = src.get("layer_range")
            if (
                not isinstance(rng, list)
                or len(rng) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in rng)
                or not 0 <= rng[0] < rng[1]
            ):
                raise ConfigError(
                    f"{source}: {at}.layer_range: expected [start, end] with 0 <= start < end, "
                    f"got {rng!r}"
                )
            if span is None:
                span = (rng[0], rng[1])
            elif tuple(rng) != span:
                raise ConfigError(
                    f"{source}: {at}.layer_range {rng} differs from {where}.sources[0]'s "
                    f"{list(span)}: taking different layers from different models is a "
                    "frankenmerge, which is not supported; give every source of a slice the "
                    "same layer_range"
                )
            model = ref(src["model"], f"{at}.model")
            if any(s.model == model for s in sources):
                raise ConfigError(f"{source}: {at}: model {model!r} appears twice in {where}")
            params = _check_parameters(src.get("parameters"), f"{source}: {at}.parameters")
            sources.append(ModelSpec(model, params))
        assert span is not None
        if out and {s.model for s in sources} != {s.model for s in out[0].sources}:
            raise ConfigError(
                f"{source}: {where} merges {sorted(s.model for s in sources)} but slices[0] "
                f"merges {sorted(s.model for s in out[0].sources)}; every slice must merge the "
                "same models (anything else is a frankenmerge, which is not supported)"
            )
        expected = out[-1].end if out else 0
        if span[0] != expected:
            raise ConfigError(
                f"{source}: {where}.sources[*].layer_range starts at {span[0]}, expected "
                f"{expected}: slices must cover the layers in order from 0 without gaps or "
                "repeats (anything else is a frankenmerge, which is not supported)"
            )
        params = _check_parameters(sl.get("parameters"), f"{source}: {where}.parameters")
        out.append(SliceSpec(span[0], span[1], tuple(sources), params))
    return tuple(out)


def _check_parameters(params: Any, where: str) -> dict[str, Setting]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"{where}: expected a mapping of parameter names to values")
    for key, value in params.items():
        _check_setting(value, f"{where}.{key}")
    return dict(params)


def _resolve_ref(value: str, root: Path | None) -> str:
    """Relative local paths in a config are relative to the config file, like mergekit."""
    if root is None or value.startswith(("/", "~")):
        return value
    candidate = root / value
    return str(candidate) if candidate.exists() else value
