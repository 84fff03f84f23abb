"""Kinship-matrix throughput next to a plain read of the same files, and its peak memory.

    python benchmarks/kinship_throughput.py [--mb 256] [--models 3] [--repeats 3] [--chunk N]

Writes a base and ``--models`` fine-tunes (bf16 safetensors of about ``--mb`` MB each, llama-like
tensor names) into a temporary folder, then in one run measures:

- plain read: every checkpoint file read with large unbuffered ``readinto`` calls. The page cache
  cannot be dropped without root, so every file is read once to warm it and all timings are warm
  (reads from memory); the ratio is then to the cheapest possible way of getting the bytes.
- ``kinship_matrix`` sequential (``parallel=False``) and on a local Ray (one task per group of
  tensors, two groups per CPU), as GB/s of checkpoint bytes (base + models) per second, best of
  ``--repeats``; Ray start-up and the first (worker start-up) call are reported apart.
- peak memory: peak RSS (``VmHWM``: ``ru_maxrss`` without the parent's peak, which survives
  fork + exec) and peak heap (sampled ``RssAnon``) of a fresh subprocess that runs the sequential
  kinship, minus those of one that only imports it, next to the checkpoint and tensor sizes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from evoray.kinship.gram import CHUNK_ELEMS, RELEASE_BYTES
from evoray.kinship.matrix import kinship_matrix

ROOT = sys.path[0]

HIDDEN, INTER, VOCAB = 1024, 2816, 16384


def layout(mb: float) -> dict[str, tuple[int, ...]]:
    """Llama-like tensor shapes summing to about ``mb`` MB in bf16."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN)
    fixed = 2 * (2 * VOCAB * HIDDEN + HIDDEN)
    n_layers = max(1, round((mb * 1e6 - fixed) / per_layer))
    for i in range(n_layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[f"{p}mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[f"{p}input_layernorm.weight"] = (HIDDEN,)
        shapes[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def make_checkpoints(folder: Path, mb: float, k: int) -> list[Path]:
    """Base + k fine-tunes; deltas share a common part so kinship is not trivially 0."""
    g = torch.Generator().manual_seed(0)
    shapes = layout(mb)
    dicts: list[dict[str, torch.Tensor]] = [{} for _ in range(k + 1)]
    for name, shape in shapes.items():
        base = torch.randn(shape, generator=g) * 0.02
        shared = torch.randn(shape, generator=g) * 1e-3
        dicts[0][name] = base.bfloat16()
        for i in range(1, k + 1):
            own = torch.randn(shape, generator=g) * 1e-3
            dicts[i][name] = (base + shared + own).bfloat16()
    paths = []
    for i, d in enumerate(dicts):
        path = folder / ("base" if i == 0 else f"ft{i}")
        path.mkdir(parents=True, exist_ok=True)
        save_file(d, str(path / "model.safetensors"))
        paths.append(path)
    return paths


def plain_read(files: list[Path], block: int = 64 << 20) -> int:
    buf = bytearray(block)
    view = memoryview(buf)
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# VmHWM is ru_maxrss of this process image (ru_maxrss itself carries the parent's peak over
# fork + exec). RssAnon (heap: tensors, buffers) has no kernel peak, so a thread samples it;
# the rest of RSS is file pages of the memory-mapped checkpoints.
_CHILD = """
import sys, threading, time
sys.path.insert(0, {root!r})
import torch
from evoray.kinship.matrix import kinship_matrix

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

anon, done = [status("RssAnon")], []
def sample():
    while not done:
        anon.append(status("RssAnon"))
        time.sleep(0.002)
t = threading.Thread(target=sample)
t.start()
if {run}:
    kinship_matrix({base!r}, {models!r}, parallel=False, chunk_elems={chunk})
done.append(1)
t.join()
print(status("VmHWM"), max(anon))
"""


def child_peaks(paths: list[Path], chunk: int, run: bool) -> tuple[int, int]:
    """(peak RSS, peak anonymous RSS) in bytes of a fresh Python running the kinship or not."""
    code = _CHILD.format(
        root=ROOT, run=run, base=str(paths[0]), models=[str(p) for p in paths[1:]], chunk=chunk
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    hwm, anon = out.stdout.strip().splitlines()[-1].split()
    return int(hwm), int(anon)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=256, help="size of each checkpoint in MB (bf16)")
    ap.add_argument("--models", type=int, default=3, help="fine-tunes besides the base")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=CHUNK_ELEMS, help="chunk_elems to measure")
    ap.add_argument("--dir", type=Path, default=None, help="keep checkpoints here (reused)")
    ap.add_argument("--no-ray", action="store_true", help="skip the parallel measurement")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        t0 = time.perf_counter()
        paths = make_checkpoints(folder, args.mb, args.models)
        files = [p / "model.safetensors" for p in paths]
        nbytes = sum(f.stat().st_size for f in files)
        largest = VOCAB * HIDDEN * 2  # bytes of the embedding, the largest tensor
        print(
            f"torch {torch.__version__}, threads {torch.get_num_threads()} (os.cpu_count "
            f"{os.cpu_count()}); base + {args.models} models x {files[0].stat().st_size / 1e6:.0f}"
            f" MB bf16 = {nbytes / 1e9:.2f} GB, written in {time.perf_counter() - t0:.1f} s; "
            f"chunk_elems {args.chunk}"
        )
        plain_read(files)  # warm the page cache: every timing below reads from memory
        base, models = paths[0], paths[1:]

        t_read = best_of(lambda: plain_read(files), args.repeats)
        read_gbps = nbytes / t_read / 1e9
        rows = [("plain read (warm)", t_read, read_gbps)]

        def seq() -> object:
            return kinship_matrix(base, models, parallel=False, chunk_elems=args.chunk)

        t_seq = best_of(seq, args.repeats)
        rows.append(("kinship sequential", t_seq, nbytes / t_seq / 1e9))

        if not args.no_ray:
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
            t_init = time.perf_counter() - t0

            def par() -> object:
                return kinship_matrix(base, models, parallel=True, chunk_elems=args.chunk)

            t_first = best_of(par, 1)
            t_par = best_of(par, args.repeats)
            ray.shutdown()
            rows.append(("kinship Ray tasks", t_par, nbytes / t_par / 1e9))

        print(f"{'':<22}{'time s':>9}{'GB/s':>8}{'ratio':>7}")
        for label, t, gbps in rows:
            print(f"{label:<22}{t:>9.3f}{gbps:>8.2f}{gbps / read_gbps:>7.2f}")
        if not args.no_ray:
            print(
                f"(Ray start {t_init:.1f} s; first parallel call, with worker start, "
                f"{t_first:.2f} s)"
            )

        idle, idle_anon = child_peaks(paths, args.chunk, run=False)
        peak, peak_anon = child_peaks(paths, args.chunk, run=True)
        mb = 1e6
        print(
            f"peak memory of a sequential kinship above a process that only imports it: "
            f"RSS (ru_maxrss/VmHWM) +{(peak - idle) / mb:.0f} MB, of which heap (RssAnon) "
            f"+{(peak_anon - idle_anon) / mb:.0f} MB, the rest mapped file pages (released every "
            f"{RELEASE_BYTES / mb:.0f} MB read)\n"
            f"  vs one checkpoint {nbytes / len(files) / mb:.0f} MB, all {nbytes / mb:.0f} MB, "
            f"largest tensor x checkpoints {largest * len(files) / mb:.0f} MB "
            f"(imports alone: RSS {idle / mb:.0f} MB)"
        )


if __name__ == "__main__":
    main()
