"""What a merge method is: its parameters (defaults, per model or global, checks) and how one
tensor's resolved values are validated and passed to its function.

A *per-model* parameter is mergekit's "tensor parameter": it may be set per model
(``models[].parameters``) or globally, the global value serving as the default for every model.
``MergeMethod.merge`` gets already-resolved scalars for one tensor and validates them, so a bad
value is reported with the method, the parameter, the model index and the tensor name.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from evoray.errors import ConfigError, LayoutError

__all__ = ["REQUIRED", "MergeMethod", "ParamDef", "derive_seed"]


class _Required:
    """Sentinel default: the user must give this parameter."""

    _instance: _Required | None = None

    def __new__(cls) -> _Required:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "REQUIRED"

    def __reduce__(self) -> str:  # pickles (e.g. to Ray workers) as the same singleton
        return "REQUIRED"


REQUIRED: Any = _Required()


# Value checkers: return an error fragment ("must be ...") or None when the value is fine.
def finite(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return "must be a finite number"
    return None


def in_open_unit(v: Any) -> str | None:  # (0, 1]
    if finite(v) or not 0 < v <= 1:
        return "must be a number in (0, 1]"
    return None


def in_unit(v: Any) -> str | None:  # [0, 1]
    if finite(v) or not 0 <= v <= 1:
        return "must be a number in [0, 1]"
    return None


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


@dataclass(frozen=True, kw_only=True)
class ParamDef:
    name: str
    default: Any  # REQUIRED when the user must give it
    per_model: bool  # mergekit "tensor parameter": per model, or global as a default for all
    doc: str = ""
    check: Callable[[Any], str | None] = field(default=finite, repr=False, compare=False)

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


MergeFn = Callable[..., Tensor]
"""``fn(tensors, base, per_model_params, global_params, seeds, out) -> Tensor``."""


@dataclass(frozen=True, kw_only=True)
class MergeMethod:
    name: str
    needs_base: bool  # base_model required; passed separately, NOT in `tensors`
    min_models: int  # non-base models
    max_models: int | None
    params: tuple[ParamDef, ...]
    doc: str
    uses_seed: bool = False  # True when the result depends on `seed` (DARE's random masks)
    _fn: MergeFn | None = field(default=None, repr=False, compare=False)

    def param(self, name: str) -> ParamDef:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def per_model_params(self) -> tuple[ParamDef, ...]:
        return tuple(p for p in self.params if p.per_model)

    @property
    def global_params(self) -> tuple[ParamDef, ...]:
        return tuple(p for p in self.params if not p.per_model)

    def _where(self, tensor_name: str, model: int | None = None) -> str:
        parts = []
        if model is not None:
            parts.append(f"model #{model}")
        if tensor_name:
            parts.append(f"tensor '{tensor_name}'")
        return f" ({', '.join(parts)})" if parts else ""

    def _allowed(self, per_model: bool | None = None) -> str:
        names = [p.name for p in self.params if per_model is None or p.per_model == per_model]
        return ", ".join(names) if names else "none"

    def check_models(self, n_models: int, has_base: bool, *, tensor_name: str = "") -> None:
        """Model-count and base-model checks (no tensors needed; usable at config time)."""
        where = self._where(tensor_name)
        if self.needs_base and not has_base:
            raise ConfigError(f"{self.name}: needs a base_model{where}")
        if n_models < self.min_models or (
            self.max_models is not None and n_models > self.max_models
        ):
            if self.max_models == self.min_models:
                want = f"exactly {self.min_models}"
            elif self.max_models is None:
                want = f"at least {self.min_models}"
            else:
                want = f"{self.min_models} to {self.max_models}"
            extra = " besides the base model" if self.needs_base else ""
            raise ConfigError(f"{self.name}: needs {want} model(s){extra}, got {n_models}{where}")

    def misplaced_param(
        self, params: Iterable[str], model_params: Sequence[Iterable[str]]
    ) -> tuple[int | None, str, bool] | None:
        """The first parameter name that cannot be used, as ``(model index, name, known)``:
        an unknown merge-level name (index None, known False), an unknown per-model name
        (known False), or a global parameter set per model (known True); None if all fit."""
        known = {p.name: p for p in self.params}
        for key in params:
            if key not in known:
                return None, key, False
        for i, mp in enumerate(model_params):
            for key in mp:
                if key not in known or not known[key].per_model:
                    return i, key, key in known
        return None

    def resolve_params(
        self,
        model_params: Sequence[Mapping[str, Any]],
        params: Mapping[str, Any],
        *,
        tensor_name: str = "",
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Validate and complete parameters: unknown keys, missing required values and
        out-of-range values raise ConfigError; returns (per-model dicts, global dict) with every
        parameter present. A per-model parameter given in ``params`` is the default for all
        models."""
        bad = self.misplaced_param(params, model_params)
        if bad is not None:
            i, key, known = bad
            if i is None:
                raise ConfigError(
                    f"{self.name}: unknown parameter '{key}'{self._where(tensor_name)}; "
                    f"allowed: {self._allowed()}"
                )
            if not known:
                raise ConfigError(
                    f"{self.name}: unknown parameter '{key}'{self._where(tensor_name, i)}; "
                    f"allowed per model: {self._allowed(True)}"
                )
            raise ConfigError(
                f"{self.name}: parameter '{key}' is global and cannot be set per model"
                f"{self._where(tensor_name, i)}; set it under the merge's parameters"
            )
        for p in self.per_model_params:  # a global default must be valid even if overridden
            if p.name in params:
                self._value(p, params[p.name], tensor_name, None)
        glob: dict[str, Any] = {}
        for p in self.global_params:
            glob[p.name] = self._value(p, params.get(p.name, p.default), tensor_name, None)
        per: list[dict[str, Any]] = []
        for i, mp in enumerate(model_params):
            d = {}
            for p in self.per_model_params:
                v = mp.get(p.name, params.get(p.name, p.default))
                d[p.name] = self._value(p, v, tensor_name, i)
            per.append(d)
        return per, glob

    def _value(self, p: ParamDef, v: Any, tensor_name: str, model: int | None) -> Any:
        where = self._where(tensor_name, model)
        if v is REQUIRED:
            how = (
                "set it under models[].parameters for every model, or once under parameters"
                if p.per_model
                else "set it under parameters"
            )
            raise ConfigError(f"{self.name}: missing required parameter '{p.name}'{where}; {how}")
        problem = p.check(v)
        if problem:
            raise ConfigError(f"{self.name}: parameter '{p.name}' {problem}, got {v!r}{where}")
        return v

    def merge(
        self,
        tensors: list[Tensor],
        base: Tensor | None,
        model_params: list[dict[str, Any]],
        params: dict[str, Any],
        *,
        seed: int = 0,
        tensor_name: str = "",
        out: Tensor | None = None,
    ) -> Tensor:
        """Merge one tensor; float32 result of the inputs' shape (the caller casts).

        ``tensors`` are the non-base models; ``model_params[i]`` their resolved scalar per-model
        parameters; ``params`` the resolved scalar global parameters. Seeds for random methods
        are derived from ``(seed, tensor_name, model index)`` (:func:`derive_seed`). ``out``, a
        contiguous float32 buffer of the same numel not shared with an input, receives the result
        (reusing one saves a fresh allocation's page faults per tensor).
        """
        if len(model_params) != len(tensors):
            raise ValueError(
                f"{self.name}: got {len(model_params)} parameter sets for {len(tensors)} models"
            )
        self.check_models(len(tensors), base is not None, tensor_name=tensor_name)
        ref = base if (self.needs_base and base is not None) else tensors[0]
        for i, t in enumerate(tensors):
            if t.shape != ref.shape:
                raise LayoutError(
                    f"{self.name}: model #{i} has shape {tuple(t.shape)} but "
                    f"{'the base' if ref is base else 'model #0'} has {tuple(ref.shape)}"
                    f"{self._where(tensor_name)}"
                )
        per, glob = self.resolve_params(model_params, params, tensor_name=tensor_name)
        seeds = [derive_seed(seed, tensor_name, i) for i in range(len(tensors))]
        assert self._fn is not None
        try:
            return self._fn(tensors, base if self.needs_base else None, per, glob, seeds, out)
        except ConfigError as e:
            where = self._where(tensor_name)
            if where and tensor_name not in str(e):
                raise ConfigError(f"{e}{where}") from None
            raise


def derive_seed(seed: int, tensor_name: str, index: int) -> int:
    """A 63-bit seed from (run seed, tensor name, model index), stable across processes and
    Python versions (blake2b, not ``hash()``) and independent of the order tensors are merged."""
    h = hashlib.blake2b(f"{int(seed)}\x00{tensor_name}\x00{index}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)
