"""The fused CPU build of DE offspring: one pass over memory instead of one per torch op.

A CPU worker's eager build (``de.build_range``) costs about fifteen elementwise passes plus the
mask's integer hash, some 20x a memory copy of the model's bytes; the C loop in
``de_kernel.c`` reads the population slices once and writes the offspring once, bit-identical
to the eager build (same hash, same float32 operations in the same order, no FMA contraction,
same bfloat16 rounding). It is compiled with the system C compiler on first use and cached per
source, flags and CPU (``$EVORAY_HOME/kernels``, default ``~/.cache/evoray/kernels``), then
checked against the eager build on a small vector before it is trusted. Without a compiler,
or with ``EVORAY_BUILD_KERNEL=eager``, builds stay eager (same offspring, slower).

Builds longer than a few blocks are split over ``torch.get_num_threads()`` threads (ctypes
releases the GIL), so a worker's ``torch_threads`` setting applies as it does to torch ops.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from evoray.kinship.metrics import KinshipSums

if TYPE_CHECKING:
    from evoray.strategies.de import Recipe

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("de_kernel.c")
_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}
# Tried in order: the first flag set that compiles is used. -ffp-contract=off is in every one:
# without it the compiler may fuse a multiply and an add, and offspring would differ.
_FLAGS = (
    ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp-simd"),
    ("-O3", "-ffp-contract=off", "-fopenmp-simd"),
    ("-O3", "-ffp-contract=off"),
)
_MIN_SPLIT = 8  # blocks per thread below which a build is not split
_enabled = os.environ.get("EVORAY_BUILD_KERNEL", "fused").lower() != "eager"


def set_enabled(on: bool) -> bool:
    """Use the fused build (True) or the eager torch build (False); returns the old setting.
    For comparisons and debugging: both build the same offspring."""
    global _enabled
    old, _enabled = _enabled, on
    return old


def _cache_dir() -> Path:
    home = os.environ.get("EVORAY_HOME") or Path.home() / ".cache" / "evoray"
    return Path(home) / "kernels"


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: a cache shared by unlike nodes keeps one file each."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _compile(cc: str, flags: Sequence[str], out: Path) -> bool:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            log.debug("%s failed: %s", " ".join(cmd), done.stderr.strip())
            return False
        os.replace(tmp, out)  # atomic: workers of one node may compile at once
        return True
    except (OSError, subprocess.SubprocessError) as e:
        log.debug("%s failed: %s", " ".join(cmd), e)
        return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    P, I64 = ctypes.c_void_p, ctypes.c_int64
    for mut in ("evolver", "rand1"):
        for a in _DTYPES.values():
            for b in _DTYPES.values():
                fn = getattr(lib, f"build_{mut}_{a}_{b}")
                fn.restype = None
                fn.argtypes = [P, P, P, P, P, P, I64, I64, ctypes.c_float, ctypes.c_uint64]
                fn.argtypes += [P, P, P, P]
    return lib


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no compiler, a failed build, or a failed self-check)."""
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        log.info("no C compiler found: DE offspring are built with eager torch ops")
        return None
    source = SOURCE.read_bytes()
    for flags in _FLAGS:
        key = hashlib.sha256(
            b"\0".join([source, cc.encode(), " ".join(flags).encode(), _cpu_signature().encode()])
        ).hexdigest()[:16]
        for root in (_cache_dir(), Path(tempfile.gettempdir()) / "evoray-kernels"):
            path = root / f"de_kernel-{key}.so"
            try:
                if path.exists() or _compile(cc, flags, path):
                    lib = _load(path)
                    if _self_check(lib):
                        return lib
                    log.warning("the fused DE build differs from the eager one; using eager")
                    return None
            except OSError as e:  # an unwritable cache, a stale or foreign file
                log.debug("kernel at %s unusable: %s", path, e)
    log.info("the fused DE build did not compile: offspring are built with eager torch ops")
    return None


def _self_check(lib: ctypes.CDLL) -> bool:
    """The kernel against the eager build on a vector of odd length, both mutations and all
    dtypes: a compiler that contracts or reorders float math is caught here, not in a run."""
    from evoray.strategies.de import BLOCK, Recipe, build_range

    g = torch.Generator().manual_seed(0)
    n = 2 * BLOCK + 1234
    pop32 = [torch.randn(n, generator=g) for _ in range(4)]
    for dtype in _DTYPES:
        pop = [p.to(dtype) for p in pop32]
        for recipe in (Recipe(0, (1,), 0.6, 0.4, 11), Recipe(1, (0, 2, 3), 0.7, 0.5, 12, "rand1")):
            want = build_range(recipe, pop, 5, n, eager=True)
            for out_dtype in _DTYPES:
                got = torch.empty(n - 5, dtype=out_dtype)
                _run(lib, recipe, pop, 5, n, got, None)
                if not torch.equal(got, want.to(out_dtype)):
                    return False
    return True


def usable(population: Sequence[torch.Tensor], out: torch.Tensor, base=None) -> bool:
    """Whether the fused build can write ``out`` from ``population`` (and ``base``)."""
    if not _enabled or out.device.type != "cpu" or out.dtype not in _DTYPES:
        return False
    dtype = population[0].dtype
    tensors = [*population, *([] if base is None else [base])]
    if dtype not in _DTYPES or not out.is_contiguous():
        return False
    if any(t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return False
    return kernel() is not None


def _pool() -> ThreadPoolExecutor:
    return _pools(torch.get_num_threads())


@functools.cache
def _pools(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="evoray-build")


def build(
    recipe: Recipe,
    population: Sequence[torch.Tensor],
    start: int,
    stop: int,
    out: torch.Tensor,
    base: torch.Tensor | None = None,
) -> KinshipSums | None:
    """Write elements [start, stop) of the offspring into ``out`` (their length; check
    ``usable`` first). With ``base``, also returns the kinship sums of the offspring's delta
    from the base (as stored) against its parent's."""
    lib = kernel()
    if lib is None or out.numel() != stop - start:
        raise ValueError("the fused build needs the kernel and an output of the range's length")
    from evoray.strategies.de import BLOCK

    threads = torch.get_num_threads()
    blocks = -(-(stop - start) // BLOCK)
    if threads <= 1 or blocks < 2 * _MIN_SPLIT:
        return _run(lib, recipe, population, start, stop, out, base)
    parts = min(threads, blocks // _MIN_SPLIT)
    step = -(-blocks // parts) * BLOCK
    edges = [start, *range((start // BLOCK) * BLOCK + step, stop, step), stop]
    jobs = [
        _pool().submit(_run, lib, recipe, population, a, b, out[a - start : b - start], base)
        for a, b in itertools.pairwise(edges)
        if b > a
    ]
    sums = [j.result() for j in jobs]
    if base is None:
        return None
    total = KinshipSums()
    for s in sums:
        total = total.merge(s)
    return total


def _run(lib, recipe, population, start, stop, out, base) -> KinshipSums | None:
    from evoray.strategies.de import BLOCK, _block_keys

    k1, k2, forced = _block_keys(recipe.seed, start // BLOCK, -(-stop // BLOCK))
    refs = [population[r] for r in recipe.refs]
    refs += [refs[0]] * (3 - len(refs))
    dtype = _DTYPES[population[0].dtype]
    fn = getattr(lib, f"build_{recipe.mutation}_{dtype}_{_DTYPES[out.dtype]}")
    item = population[0].element_size()
    sums = np.zeros(6, dtype=np.float64)
    fn(
        population[recipe.target].data_ptr() + start * item,
        *(r.data_ptr() + start * item for r in refs),
        None if base is None else base.data_ptr() + start * item,
        out.data_ptr(),
        start,
        stop,
        recipe.F,
        min(round(recipe.CR * 2**32), 2**32),
        k1.ctypes.data,
        k2.ctypes.data,
        forced.ctypes.data,
        sums.ctypes.data if base is not None else None,
    )
    if base is None:
        return None
    n, sa, sb, saa, sbb, sab = sums.tolist()
    return KinshipSums(int(n), sa, sb, saa, sbb, sab)
