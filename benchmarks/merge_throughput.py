"""Merge-operator throughput next to a plain memory copy of the same bytes.

    python benchmarks/merge_throughput.py [--numel N] [--models K] [--dtype bfloat16|float32]

For each method: GB/s of input bytes (base + models, in the input dtype) per second, and the
ratio to ``dst.copy_(src)`` of that many bytes measured in the same run (best of --repeats;
``dst`` preallocated). Two columns: the operator as normally called (a fresh float32 output per
call, whose first-touch page faults are a large part of the cost for the elementwise methods)
and with ``out=`` a reused float32 buffer. A copy reads and writes every byte, a merge reads every
input and writes one float32 tensor, so the elementwise methods (linear, task_arithmetic) can
reach ~1x; selection-based methods (ties, breadcrumbs) and random masks (dare) do more work
per byte.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from evoray.merge import interpolation
from evoray.merge import operators as ops


def best_of(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (allocator, thread pool)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=16 * 1024 * 1024, help="elements per tensor")
    ap.add_argument("--models", type=int, default=3, help="non-base models")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", default="", help="comma-separated subset (default: all)")
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    n, k = args.numel, args.models
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g).to(dtype)
    models = [(base.float() + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(k)]
    w = [1.0 / k] * k
    dens = [0.5] * k
    seeds = list(range(k))
    elem = torch.empty(0, dtype=dtype).element_size()

    methods: dict[str, tuple[Callable[..., object], int]] = {
        # name: (call accepting out=, number of input tensors read)
        "linear": (lambda **kw: ops.linear(models, w, **kw), k),
        "task_arithmetic": (lambda **kw: ops.task_arithmetic(base, models, w, **kw), k + 1),
        "ties": (lambda **kw: ops.ties(base, models, w, dens, **kw), k + 1),
        "dare_linear": (lambda **kw: ops.dare_linear(base, models, w, dens, seeds, **kw), k + 1),
        "dare_ties": (lambda **kw: ops.dare_ties(base, models, w, dens, seeds, **kw), k + 1),
        "breadcrumbs": (
            lambda **kw: ops.breadcrumbs(base, models, w, dens, [0.01] * k, **kw),
            k + 1,
        ),
        "slerp": (lambda **kw: interpolation.slerp(0.4, base, models[0], **kw), 2),
        "model_stock": (lambda **kw: interpolation.model_stock(base, models, **kw), k + 1),
    }
    if args.methods:
        wanted = args.methods.split(",")
        unknown = set(wanted) - set(methods)
        if unknown:
            ap.error(f"unknown methods {sorted(unknown)}; known: {', '.join(methods)}")
        methods = {m: methods[m] for m in wanted}

    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()} "
        f"(os.cpu_count {os.cpu_count()}), {k} models x {n:,} elements {args.dtype}, "
        f"best of {args.repeats}"
    )
    copy_cache: dict[int, float] = {}

    def copy_gbps(n_tensors: int) -> float:
        if n_tensors not in copy_cache:
            src = torch.empty(n * n_tensors, dtype=dtype).fill_(1.0)
            dst = torch.empty_like(src)
            t = best_of(lambda: dst.copy_(src), args.repeats)
            copy_cache[n_tensors] = src.numel() * elem / t / 1e9
            del src, dst
        return copy_cache[n_tensors]

    out = torch.empty(n, dtype=torch.float32)
    head = f"{'method':<17}{'copy GB/s':>10}{'time s':>9}{'GB/s':>8}{'ratio':>7}"
    print(f"{'':<27}{'fresh output':^24}{'out= reused':^24}")
    print(f"{head}{'time s':>9}{'GB/s':>8}{'ratio':>7}")
    for name, (fn, n_in) in methods.items():
        ref = copy_gbps(n_in)
        row = f"{name:<17}{ref:>10.2f}"
        for kwargs in ({}, {"out": out}):
            t = best_of(lambda fn=fn, kwargs=kwargs: fn(**kwargs), args.repeats)
            gbps = n_in * n * elem / t / 1e9
            row += f"{t:>9.4f}{gbps:>8.2f}{gbps / ref:>7.2f}"
        print(row)


if __name__ == "__main__":
    main()
