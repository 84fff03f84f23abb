"""Run a merge config: stream tensors from checkpoints through a merge method into an HF folder.

Memory stays near one tensor per input (plus the output shard being filled), never N whole
models: each output tensor is produced from the inputs' copies of that one tensor, written, and
dropped before the next is read. Everything that can be checked without reading weights
(method, parameters, architectures, tensor names and shapes) is checked before the first read,
so a bad config fails in seconds rather than half-way through a multi-GB merge.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from evoray.config.merge_config import MergeConfig
from evoray.errors import CheckpointError, ConfigError
from evoray.merge import METHODS, MergeMethod, get_method
from evoray.merge.walker import TensorMerge
from evoray.weights.checkpoint import Checkpoint, open_checkpoint
from evoray.weights.export import ModelFolderWriter
from evoray.weights.layers import num_layers
from evoray.weights.layout import Layout, check_same_architecture

log = logging.getLogger(__name__)
DEFAULT_SHARD_BYTES = 5 * 2**30


@dataclass
class MergePlan:
    """A validated merge: the method, opened checkpoints and the shared layout."""

    config: MergeConfig
    method: MergeMethod
    base: Checkpoint | None
    models: list[Checkpoint]  # the inputs passed to the method (the base excluded if it needs one)
    model_indices: list[int]  # index of each input in config.models (for its parameters)
    reference: Checkpoint  # config, tokenizer and non-float tensors come from here
    layout: Layout
    n_layers: int
    out_dtype: torch.dtype
    seed: int = 0
    allow_nonfinite: bool = False  # else a NaN/Inf input tensor stops the merge, named
    _scratch: torch.Tensor | None = field(default=None, repr=False)

    @cached_property
    def walker(self) -> TensorMerge:
        return TensorMerge(
            config=self.config,
            method=self.method,
            n_layers=self.n_layers,
            model_indices=tuple(self.model_indices),
            seed=self.seed,
        )

    def parameters(self, tensor_name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-model and global parameter values for one tensor (gradients and filters applied)."""
        return self.walker.parameters(tensor_name)

    def merge_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor from every input, merge it, return it in the output dtype.

        The float32 result goes into one scratch buffer reused for every tensor (a fresh
        allocation per tensor costs as much in page faults as the merge itself), so the
        returned tensor is only valid until the next call: the writer copies it.
        """
        base = self._read(self.base, name) if self.base is not None else None
        tensors = [self._read(c, name) for c in self.models]
        slot = self.layout.slot(name)
        if self._scratch is None:
            self._scratch = torch.empty(max(s.numel for s in self.layout.slots))
        out = self._scratch[: slot.numel].view(slot.shape)
        return self.walker.merge(name, tensors, base, out=out).to(self.out_dtype)

    def _read(self, ckpt: Checkpoint, name: str) -> torch.Tensor:
        t = ckpt.get(name)
        if not self.allow_nonfinite:
            ckpt.check_finite(name, t)  # one pass over the tensor; a NaN merge is worse
        # mergekit rounds inputs to `dtype` before merging; we then compute in float32.
        return t.to(self.config.dtype) if self.config.dtype is not None else t

    def iter_tensors(self, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """All output tensors in the reference's order; non-floating ones copied as they are."""
        float_names = set(self.layout.names)
        bar = tqdm(
            total=self.layout.nbytes,
            unit="B",
            unit_scale=True,
            desc="merging",
            disable=None if progress else True,
        )
        with bar:
            for name in self.reference.names():
                if name not in float_names:
                    yield name, self.reference.get(name)
                    continue
                yield name, self.merge_tensor(name)
                bar.update(self.layout.slot(name).numel * self.layout.storage_dtype.itemsize)

    def close(self) -> None:
        for ckpt in {id(c): c for c in [*self.models, self.reference, self.base] if c}.values():
            ckpt.close()


def plan_merge(
    config: MergeConfig,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    seed: int = 0,
    allow_nonfinite: bool = False,
) -> MergePlan:
    """Open the config's checkpoints and check everything that needs no weight data."""
    method = get_method(config.merge_method)
    _check_parameter_names(config, method)
    if method.needs_base and config.base_model is None:
        raise ConfigError(f"{config.source}: merge_method {method.name} needs 'base_model'")

    opened: dict[str, Checkpoint] = {}

    def open_ref(ref: str) -> Checkpoint:
        if ref not in opened:
            opened[ref] = open_checkpoint(ref, allow_pickle=allow_pickle)
        return opened[ref]

    try:
        base = open_ref(config.base_model) if config.base_model is not None else None
        if method.needs_base:
            indices = [i for i, m in enumerate(config.models) if m.model != config.base_model]
        else:
            indices = list(range(len(config.models)))
        models = [open_ref(config.models[i].model) for i in indices]
        try:
            method.check_models(len(models), base is not None)
        except ConfigError as exc:
            raise ConfigError(f"{config.source}: {exc}") from None
        reference = base if base is not None else models[0]
        for ckpt in opened.values():
            _check_remote_code(ckpt, trust_remote_code)
        check_same_architecture({c.source: c.config for c in opened.values()})
        layout = Layout.from_checkpoint(reference)
        for ckpt in opened.values():
            if ckpt is not reference:
                layout.check(ckpt)
        plan = MergePlan(
            config=config,
            method=method,
            base=base if method.needs_base else None,
            models=models,
            model_indices=indices,
            reference=reference,
            layout=layout,
            n_layers=num_layers(reference.config, layout.names),
            out_dtype=config.out_dtype or config.dtype or layout.storage_dtype,
            seed=seed,
            allow_nonfinite=allow_nonfinite,
        )
        try:
            config.check_slices_cover(plan.n_layers)
        except ConfigError as exc:
            raise ConfigError(f"{exc} ({reference.source} has {plan.n_layers})") from None
        _validate_all_tensors(plan)
        return plan
    except BaseException:
        for ckpt in opened.values():
            ckpt.close()
        raise


def _parameter_places(config: MergeConfig) -> list[tuple[str, dict[str, Any], bool]]:
    """Every ``parameters`` mapping of the config: (its dotted path, it, whether per model)."""
    places = [("parameters", config.parameters, False)]
    places += [(f"models[{i}].parameters", m.parameters, True) for i, m in enumerate(config.models)]
    for k, sl in enumerate(config.slices):
        places.append((f"slices[{k}].parameters", sl.parameters, False))
        places += [
            (f"slices[{k}].sources[{j}].parameters", src.parameters, True)
            for j, src in enumerate(sl.sources)
        ]
    return places


def _check_parameter_names(config: MergeConfig, method: MergeMethod) -> list[str]:
    """Errors for names no method knows (with a did-you-mean) and global parameters set per
    model; a parameter only other methods use (``gamma`` under ``task_arithmetic``: configs are
    copied between methods) is ignored, as mergekit does, with a warning naming it. Returns
    the warnings."""
    own = {p.name: p for p in method.params}
    users: dict[str, list[str]] = {}
    for m in METHODS.values():
        for p in m.params:
            users.setdefault(p.name, []).append(m.name)
    listing = ", ".join(own) or "none"
    warnings: list[str] = []
    for place, params, per_model in _parameter_places(config):
        for name in params:
            where = f"{config.source}: {place}.{name}"
            if name in own:
                if per_model and not own[name].per_model:
                    raise ConfigError(
                        f"{where}: {name!r} is a global parameter of {method.name}; put it "
                        "under the top-level 'parameters'"
                    )
                continue
            if name in users:
                text = (
                    f"{where}: {method.name} does not use {name!r} (a parameter of "
                    f"{', '.join(users[name])}); ignored, as mergekit does"
                )
                log.warning(text)
                warnings.append(text)
                continue
            hint = difflib.get_close_matches(str(name), list(own), n=1) or (
                difflib.get_close_matches(str(name), list(users), n=1)
            )
            did = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(
                f"{where}: {method.name} has no parameter {name!r}{did} (its parameters: {listing})"
            )
    return warnings


def _validate_all_tensors(plan: MergePlan) -> None:
    """Resolve and check every tensor's parameters, so errors come before any weight is read.

    Parameters vary per tensor only through gradients and filters, so the distinct resolved
    sets are few; each is checked once.
    """
    seen: set[str] = set()
    for name in plan.layout.names:
        model_params, params = plan.parameters(name)
        key = repr((model_params, params))
        if key in seen:
            continue
        seen.add(key)
        try:
            plan.method.resolve_params(model_params, params, tensor_name=name)
        except ConfigError as exc:
            raise ConfigError(f"{plan.config.source}: {exc}") from None


def _check_remote_code(ckpt: Checkpoint, trust_remote_code: bool) -> None:
    if ckpt.config and ckpt.config.get("auto_map") and not trust_remote_code:
        raise CheckpointError(
            f"{ckpt.source} uses custom model code (auto_map in config.json). evoray runs none of "
            "it while merging, but the merged folder needs it to load; pass --trust-remote-code "
            "if you trust that code"
        )


def merge_to_folder(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    seed: int = 0,
    progress: bool = False,
    allow_nonfinite: bool = False,
) -> Path:
    """Merge per ``config`` and save an HF folder at ``out_dir`` (atomically).

    ``overwrite`` replaces only an earlier merge's folder, never one holding the config or an
    input model (see ``export.check_replaceable``); ``allow_nonfinite`` merges NaN/Inf inputs
    instead of stopping at the first such tensor."""
    plan = plan_merge(
        config,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        seed=seed,
        allow_nonfinite=allow_nonfinite,
    )
    try:
        writer = ModelFolderWriter(
            out_dir,
            max_shard_bytes=max_shard_bytes,
            overwrite=overwrite,
            protect=_protected_paths(plan),
        )
        with writer as w:
            for name, tensor in plan.iter_tensors(progress=progress):
                w.add(name, tensor)
            w.copy_support_files(plan.reference.folder, dtype=plan.out_dtype)
            tokenizer_folder = _tokenizer_folder(plan)
            if tokenizer_folder != plan.reference.folder:
                w.copy_support_files(tokenizer_folder, dtype=None, config=False)
            if config.chat_template is not None:
                w.set_chat_template(config.chat_template)
            w.write_card(
                recipe_yaml=config.to_yaml(),
                base_model=config.base_model,
                models=[m.model for m in config.models],
                method=plan.method.name,
            )
            return w.commit()
    finally:
        plan.close()


def _protected_paths(plan: MergePlan) -> list[tuple[Path, str]]:
    """What an ``--overwrite`` of the output must never delete: the config and the inputs."""
    out: list[tuple[Path, str]] = []
    if Path(plan.config.source).is_file():
        out.append((Path(plan.config.source), "the merge config"))
    for ckpt in [*plan.models, plan.reference, plan.base]:
        if ckpt is not None:
            out.append((ckpt.folder or ckpt.path, f"input model {ckpt.source!r}"))
    tok = plan.config.tokenizer_source
    if tok not in (None, "base") and Path(tok).is_dir():
        out.append((Path(tok), "the tokenizer_source folder"))
    return out


def _tokenizer_folder(plan: MergePlan) -> Path | None:
    src = plan.config.tokenizer_source
    if src is None or src == "base":
        return plan.reference.folder
    for ckpt in [*plan.models, plan.reference]:
        if ckpt.source == src:
            return ckpt.folder
    folder = Path(src)
    if not folder.is_dir():
        raise ConfigError(
            f"{plan.config.source}: tokenizer_source {src!r} must be 'base', one of the merged "
            "models, or a local folder"
        )
    return folder
