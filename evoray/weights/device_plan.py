"""Spreading one model over several devices: which layers go where, as layout segments.

A member larger than one GPU runs on a worker that spans several. The plan cuts the model, in
its forward order, into ``n`` contiguous runs of whole units (the embeddings, each transformer
block, the final norm and head), balanced by bytes: the embeddings land on the first device,
the final norm and an untied head on the last, and a tied head stays with its embedding (it is
the same tensor). Checkpoint layouts list tensors alphabetically (``lm_head`` first, block 10
before block 2), so one device's units may sit in several ranges of the layout: the plan's
``ranges`` are the maximal runs of the layout on one device, and ``make_segments`` gives each
device one allocation that its ranges view. Every tensor lies inside one range, which is what
``bind_parameters`` needs; every builder writes through ``placement.pieces``.

``model_device_map`` turns the plan into the module -> device map that accelerate's
``dispatch_model`` takes (it adds the hooks that move activations between devices).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from evoray.weights.layers import before_blocks, block_prefix, layer_index
from evoray.weights.layout import Layout
from evoray.weights.placement import Segment

ACCELERATE_HINT = "pip install 'accelerate>=0.26' (or pip install -e '.[gpu]')"


@dataclass(frozen=True)
class Unit:
    """Tensors that must share a device: one block, or the embeddings, or the norm + head."""

    key: str  # module prefix: "model.layers.3", or the first tensor's module for a merged run
    names: tuple[str, ...]
    nbytes: int
    block: bool


@dataclass(frozen=True)
class DevicePlan:
    """Where each part of the layout lives on ``n_devices`` devices (indices 0..n-1)."""

    n_devices: int
    units: tuple[Unit, ...]  # in forward order
    unit_devices: tuple[int, ...]  # device of each unit, non-decreasing
    ranges: tuple[tuple[int, int, int], ...]  # (start, stop, device), sorted, covering the layout
    tensor_devices: dict[str, int]  # layout tensor (and a tied head) -> device

    @property
    def module_devices(self) -> dict[str, int]:
        """Module prefix of each block, and each tensor's module outside the blocks -> device."""
        out: dict[str, int] = {}
        for unit, d in zip(self.units, self.unit_devices, strict=True):
            if unit.block:
                out[unit.key] = d
            else:
                out.update({_module_of(n): d for n in unit.names})
        return out

    def device_bytes(self) -> list[int]:
        out = [0] * self.n_devices
        for unit, d in zip(self.units, self.unit_devices, strict=True):
            out[d] += unit.nbytes
        return out


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _unit_key(name: str) -> tuple[str, bool]:
    prefix = block_prefix(name)
    return (prefix, True) if prefix is not None else (_module_of(name), False)


def layout_units(layout: Layout, order: Sequence[str] | None = None) -> list[Unit]:
    """The layout's tensors grouped into units, in forward order.

    ``order`` is the model's tensor names in registration order (``named_parameters``), which
    is the forward order of HF models; without it: embeddings, blocks by index, the rest. The
    leading run of non-block units (all the embeddings) merges into one unit, as does the
    trailing run (final norm and head), so neither is ever split across devices."""
    groups: dict[str, list[str]] = {}
    is_block: dict[str, bool] = {}
    for s in layout.slots:
        key, block = _unit_key(s.name)
        groups.setdefault(key, []).append(s.name)
        is_block[key] = block
    if order is not None:
        rank = {n: i for i, n in enumerate(order)}
        first = {k: min(rank.get(n, len(rank)) for n in names) for k, names in groups.items()}
        keys = sorted(groups, key=lambda k: (first[k], k))
    else:

        def fallback(k: str) -> tuple[int, int, str]:
            if is_block[k]:
                return (1, layer_index(groups[k][0]) or 0, k)
            return (0 if any(before_blocks(n) for n in groups[k]) else 2, 0, k)

        keys = sorted(groups, key=fallback)
    size = layout.storage_dtype.itemsize
    numel = {s.name: s.numel for s in layout.slots}
    units = [
        Unit(k, tuple(groups[k]), sum(numel[n] for n in groups[k]) * size, is_block[k])
        for k in keys
    ]
    return _merge_ends(units)


def _merge_ends(units: list[Unit]) -> list[Unit]:
    """Merge the leading and the trailing runs of non-block units into one unit each."""
    blocks = [i for i, u in enumerate(units) if u.block]
    if not blocks:
        return units
    lo, hi = blocks[0], blocks[-1] + 1

    def merged(run: list[Unit]) -> list[Unit]:
        if len(run) <= 1:
            return run
        names = tuple(chain.from_iterable(u.names for u in run))
        return [Unit(run[0].key, names, sum(u.nbytes for u in run), False)]

    return merged(units[:lo]) + units[lo:hi] + merged(units[hi:])


def _boundaries(sizes: Sequence[int], n: int) -> list[int]:
    """Unit indices where devices 1..n-1 start: the unit edge nearest to each ``k / n`` of the
    bytes, kept increasing so every device gets at least one unit."""
    total = sum(sizes)
    edges = [0]
    for s in sizes:
        edges.append(edges[-1] + s)
    cuts, prev = [], 0
    for k in range(1, n):
        target = k * total / n
        best = min(range(len(edges)), key=lambda i: (abs(edges[i] - target), i))
        best = max(best, prev + 1)
        best = min(best, len(sizes) - (n - k))
        cuts.append(best)
        prev = best
    return cuts


def plan_devices(layout: Layout, n_devices: int, order: Sequence[str] | None = None) -> DevicePlan:
    """Split ``layout`` into ``n_devices`` contiguous runs of whole units, balanced by bytes
    (each device within one unit's bytes of an equal share when no unit exceeds a share)."""
    if n_devices < 1:
        raise ValueError(f"need at least one device, got {n_devices}")
    units = layout_units(layout, order)
    if n_devices > len(units):
        raise ValueError(
            f"cannot spread {len(units)} layers (embeddings, blocks, head) of "
            f"{layout.source or 'the model'} over {n_devices} devices; use fewer GPUs per worker"
        )
    cuts = _boundaries([u.nbytes for u in units], n_devices)
    unit_devices = []
    d = 0
    for i in range(len(units)):
        while d < len(cuts) and i >= cuts[d]:
            d += 1
        unit_devices.append(d)
    tensor_devices = {n: dev for u, dev in zip(units, unit_devices, strict=True) for n in u.names}
    for head, emb in layout.tied:  # a tied head is its embedding's tensor
        tensor_devices[head] = tensor_devices[emb]
    ranges: list[tuple[int, int, int]] = []
    for s in layout.slots:
        dev = tensor_devices[s.name]
        if ranges and ranges[-1][2] == dev and ranges[-1][1] == s.offset:
            ranges[-1] = (ranges[-1][0], s.offset + s.numel, dev)
        else:
            ranges.append((s.offset, s.offset + s.numel, dev))
    return DevicePlan(n_devices, tuple(units), tuple(unit_devices), tuple(ranges), tensor_devices)


def make_segments(
    plan: DevicePlan, dtype: torch.dtype, devices: Sequence[torch.device | str]
) -> list[Segment]:
    """The plan's ranges as segments: one allocation per device, each range a view of it."""
    if len(devices) != plan.n_devices:
        raise ValueError(f"the plan is for {plan.n_devices} devices, got {len(devices)}")
    per_device = [0] * plan.n_devices
    for start, stop, d in plan.ranges:
        per_device[d] += stop - start
    buffers = [
        torch.empty(n, dtype=dtype, device=dev) for n, dev in zip(per_device, devices, strict=True)
    ]
    used = [0] * plan.n_devices
    segments = []
    for start, stop, d in plan.ranges:
        n = stop - start
        segments.append(Segment(start, stop, buffers[d][used[d] : used[d] + n]))
        used[d] += n
    return segments


def model_device_map(model: torch.nn.Module, plan: DevicePlan) -> dict[str, int]:
    """Module (or tensor) name -> device index for every tensor of ``model``, as coarse as it
    goes: a module whose tensors are all on one device is one entry (``""`` for the whole
    model). Layout tensors go where the plan puts them, found by identity so a tied head
    follows its embedding; other tensors (rotary tables, position ids) go with the unit whose
    module holds them, else to device 0, where the inputs are."""
    by_id: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in plan.tensor_devices:
            by_id[id(p)] = plan.tensor_devices[name]
    modules = sorted(plan.module_devices.items(), key=lambda kv: -len(kv[0]))

    def device_of(name: str, t: torch.Tensor) -> int:
        if id(t) in by_id:
            return by_id[id(t)]
        return next((d for m, d in modules if name.startswith(m + ".")), 0)

    tensors = {
        name: device_of(name, t)
        for name, t in chain(
            model.named_parameters(remove_duplicate=False),
            model.named_buffers(remove_duplicate=False),
        )
    }
    out: dict[str, int] = {}

    def visit(prefix: str, module: torch.nn.Module) -> None:
        inside = [d for n, d in tensors.items() if not prefix or n.startswith(prefix + ".")]
        if not inside:
            return
        if len(set(inside)) == 1:
            out[prefix] = inside[0]
            return
        dot = f"{prefix}." if prefix else ""
        for child, sub in module.named_children():
            visit(dot + child, sub)
        own = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for n, _ in own:
            out[dot + n] = tensors[dot + n]

    visit("", model)
    return out


def place_model(
    model: torch.nn.Module, plan: DevicePlan, devices: Sequence[torch.device]
) -> torch.nn.Module:
    """Put ``model`` (its layout tensors already bound to segments on their devices) on
    ``devices`` as planned: other tensors move to their module's device, and across several
    devices accelerate's hooks carry activations from one to the next (outputs come back to
    ``devices[0]``). Tensors already in place are not copied, so the binding holds."""
    devices = [torch.device(d) for d in devices]
    if len(set(devices)) == 1:
        return model.to(devices[0])
    try:
        from accelerate import dispatch_model
    except ImportError as e:  # pragma: no cover - accelerate comes with the gpu / lm-eval extras
        raise ImportError(
            f"a worker spanning several GPUs needs accelerate: {ACCELERATE_HINT}"
        ) from e
    device_map = {k: devices[d] for k, d in model_device_map(model, plan).items()}
    _move_unbound(model, device_map)
    return dispatch_model(model, device_map=device_map, main_device=devices[0])


def _move_unbound(model: torch.nn.Module, device_map: dict[str, torch.device]) -> None:
    """Move buffers to their mapped device (dispatch only moves those of mapped modules)."""
    keys = sorted(device_map, key=len, reverse=True)
    for name, module in model.named_modules():
        for bname, buf in list(module._buffers.items()):
            if buf is None:
                continue
            full = f"{name}.{bname}" if name else bname
            key = next((k for k in keys if k == "" or full == k or full.startswith(k + ".")), None)
            if key is not None and buf.device != device_map[key]:
                module._buffers[bname] = buf.to(device_map[key])


def worker_devices(device: str, n: int) -> list[torch.device]:
    """The devices of a worker spanning ``n``: ``cuda:0..n-1`` of its actor (Ray makes the
    GPUs it assigned visible as those), or ``n`` times the CPU (the testable stand-in)."""
    if n < 1:
        raise ValueError(f"a worker needs at least one device, got {n}")
    dev = torch.device(device)
    if n == 1:
        return [dev]
    if dev.type == "cpu":
        return [dev] * n
    if dev.type != "cuda" or dev.index is not None:
        raise ValueError(f"a worker spans several devices only as 'cuda' or 'cpu', got {device!r}")
    seen = torch.cuda.device_count()
    if seen < n:
        raise RuntimeError(
            f"execution.gpus_per_worker is {n} but this worker sees {seen} GPU(s) "
            "(CUDA_VISIBLE_DEVICES); Ray gives an actor that many GPUs of one node"
        )
    return [torch.device("cuda", i) for i in range(n)]
