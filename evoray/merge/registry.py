"""Merge-method registry: names, parameters and defaults as in mergekit.

Sources (arcee-ai/mergekit):

* ``merge_methods/registry.py``: which methods exist and each task-vector method's
  ``default_normalize`` / ``default_rescale``;
* ``merge_methods/generalized_task_arithmetic.py``: global ``int8_mask`` (False), ``normalize``,
  ``rescale``, ``lambda`` (1.0); per-model ``weight`` (required), ``density`` (1.0), ``gamma``
  (0.01, breadcrumbs only);
* ``merge_methods/linear.py``: global ``normalize`` (True), per-model ``weight`` (required);
* ``merge_methods/slerp.py``: global ``t`` (required);
* ``merge_methods/model_stock.py``: global ``filter_wise`` (False).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import Tensor

from evoray.errors import ConfigError
from evoray.merge import interpolation
from evoray.merge import operators as ops
from evoray.merge.method import (
    REQUIRED,
    MergeFn,
    MergeMethod,
    ParamDef,
    boolean,
    in_open_unit,
    in_unit,
)
from evoray.merge.sparsify import SparsificationMethod, Sparsifier

__all__ = ["METHODS", "get_method"]


# ------------------------------------------------------------------------------ method tables

_WEIGHT = ParamDef(
    name="weight",
    default=REQUIRED,
    per_model=True,
    doc="Scale of this model's tensor / task vector.",
)
_DENSITY = ParamDef(
    name="density",
    default=1.0,
    per_model=True,
    doc="Fraction of the task vector kept by sparsification.",
    check=in_open_unit,
)
_GAMMA = ParamDef(
    name="gamma",
    default=0.01,
    per_model=True,
    doc="Fraction of the largest-magnitude entries removed as outliers.",
    check=in_unit,
)
_LAMBDA = ParamDef(
    name="lambda",
    default=1.0,
    per_model=False,
    doc="Scale of the merged task vector before adding it.",
)
_INT8 = ParamDef(
    name="int8_mask",
    default=False,
    per_model=False,
    doc="Accepted for mergekit compatibility; ignored (masks are bool).",
    check=boolean,
)


def _flag(name: str, default: bool, doc: str) -> ParamDef:
    return ParamDef(name=name, default=default, per_model=False, doc=doc, check=boolean)


def _gta_params(*, normalize: bool, rescale: bool, gamma: bool) -> tuple[ParamDef, ...]:
    per = (_WEIGHT, _DENSITY, *((_GAMMA,) if gamma else ()))
    return (
        *per,
        _INT8,
        _flag("normalize", normalize, "Divide by the sum of (agreeing) weights."),
        _flag("rescale", rescale, "Restore the task vector's L1 norm after dropping."),
        _LAMBDA,
    )


def _weights(per: list[dict[str, Any]]) -> list[float]:
    return [float(p["weight"]) for p in per]


def _linear(tensors, base, per, glob, seeds, out) -> Tensor:
    return ops.linear(tensors, _weights(per), normalize=glob["normalize"], out=out)


def _gta(
    kind: SparsificationMethod | None,
    consensus: str | None,
    method: str,
    tensors: list[Tensor],
    base: Tensor,
    per: list[dict[str, Any]],
    glob: dict[str, Any],
    seeds: list[int],
    out: Tensor | None,
) -> Tensor:
    sps = None
    if kind is not None:
        sps = [
            Sparsifier(
                kind,
                float(p["density"]),
                glob["rescale"],
                gamma=float(p.get("gamma", 0.0)),
                seed=seed,
            )
            for p, seed in zip(per, seeds, strict=True)
        ]
    return ops.generalized_task_arithmetic(
        base,
        tensors,
        _weights(per),
        sps,
        consensus=consensus,
        normalize=glob["normalize"],
        lambda_=float(glob["lambda"]),
        method=method,
        out=out,
    )


def _make_gta(kind: SparsificationMethod | None, consensus: str | None, method: str) -> MergeFn:
    # A partial of a module-level function, not a closure, so a MergeMethod pickles (Ray).
    return functools.partial(_gta, kind, consensus, method)


def _slerp(tensors, base, per, glob, seeds, out) -> Tensor:
    return interpolation.slerp(float(glob["t"]), base, tensors[0], out=out)


def _model_stock(tensors, base, per, glob, seeds, out) -> Tensor:
    return interpolation.model_stock(base, tensors, filter_wise=glob["filter_wise"], out=out)


def _gta_method(
    name: str,
    *,
    sparsify: SparsificationMethod | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool,
    doc: str,
) -> MergeMethod:
    """A generalized task arithmetic method (mergekit's ``GeneralizedTaskArithmeticMerge``):
    optional sparsification of each task vector, optional sign consensus, weighted sum."""
    return MergeMethod(
        name=name,
        needs_base=True,
        min_models=1,
        max_models=None,
        params=_gta_params(
            normalize=normalize,
            rescale=rescale,
            gamma=sparsify is SparsificationMethod.magnitude_outliers,
        ),
        doc=doc,
        uses_seed=sparsify is SparsificationMethod.random,
        _fn=_make_gta(sparsify, consensus, name),
    )


_SM = SparsificationMethod

_ALL: tuple[MergeMethod, ...] = (
    MergeMethod(
        name="linear",
        needs_base=False,
        min_models=1,
        max_models=None,
        params=(_WEIGHT, _flag("normalize", True, "Divide by the sum of the weights.")),
        doc="Weighted average of the models (model soup). A base model, if any, is not used.",
        _fn=_linear,
    ),
    _gta_method(
        "task_arithmetic",
        sparsify=None,
        consensus=None,
        normalize=False,
        rescale=False,
        doc="base + lambda * sum(weight * (model - base)). density/rescale have no effect here "
        "(accepted, as mergekit does).",
    ),
    _gta_method(
        "ties",
        sparsify=_SM.magnitude,
        consensus="sum",
        normalize=True,
        rescale=False,
        doc="TIES: keep the top-density magnitudes of each task vector, elect a sign per "
        "element, average the agreeing entries.",
    ),
    _gta_method(
        "dare_linear",
        sparsify=_SM.random,
        consensus=None,
        normalize=False,
        rescale=True,
        doc="DARE: drop task-vector entries at random (keep prob. density), rescale, weighted sum.",
    ),
    _gta_method(
        "dare_ties",
        sparsify=_SM.random,
        consensus="sum",
        normalize=False,
        rescale=True,
        doc="DARE drop-and-rescale followed by TIES sign election.",
    ),
    _gta_method(
        "breadcrumbs",
        sparsify=_SM.magnitude_outliers,
        consensus=None,
        normalize=False,
        rescale=False,
        doc="Model Breadcrumbs: drop the gamma largest and the smallest magnitudes (keep "
        "density), weighted sum.",
    ),
    _gta_method(
        "breadcrumbs_ties",
        sparsify=_SM.magnitude_outliers,
        consensus="sum",
        normalize=False,
        rescale=False,
        doc="Model Breadcrumbs sparsification followed by TIES sign election.",
    ),
    MergeMethod(
        name="slerp",
        needs_base=True,
        min_models=1,
        max_models=1,
        params=(
            ParamDef(
                name="t",
                default=REQUIRED,
                per_model=False,
                doc="Interpolation factor: 0 gives the base, 1 the other model.",
                check=in_unit,
            ),
        ),
        doc="Spherical interpolation between the base and exactly one other model.",
        _fn=_slerp,
    ),
    MergeMethod(
        name="model_stock",
        needs_base=True,
        min_models=2,
        max_models=None,
        params=(
            _flag(
                "filter_wise",
                False,
                "One interpolation ratio per row (last dimension) instead of per tensor.",
            ),
        ),
        doc="Model Stock: interpolate base -> average of fine-tunes by their offsets' angle.",
        _fn=_model_stock,
    ),
)

METHODS: dict[str, MergeMethod] = {m.name: m for m in _ALL}


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; ConfigError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown merge method {name!r}; known methods: {', '.join(sorted(METHODS))}"
        ) from None
