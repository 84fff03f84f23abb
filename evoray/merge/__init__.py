"""Merge operators (pure tensor functions) and the merge-method registry."""

from evoray.merge.interpolation import lerp, model_stock, slerp
from evoray.merge.method import REQUIRED, MergeMethod, ParamDef, derive_seed
from evoray.merge.operators import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    generalized_task_arithmetic,
    linear,
    task_arithmetic,
    ties,
)
from evoray.merge.registry import METHODS, get_method

__all__ = [
    "METHODS",
    "REQUIRED",
    "MergeMethod",
    "ParamDef",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "derive_seed",
    "generalized_task_arithmetic",
    "get_method",
    "lerp",
    "linear",
    "model_stock",
    "slerp",
    "task_arithmetic",
    "ties",
]
