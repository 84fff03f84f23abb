"""Command line: ``evoray merge CONFIG.yml OUT_DIR`` (more subcommands join as they land).

User errors (``EvorayError``) print one clear line and exit 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from evoray import __version__
from evoray.errors import EvorayError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a byte count -> bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 5GB, 500MB, 2GiB)")
    number, unit = float(m.group(1)), (m.group(2) or "").upper()
    prefix = unit.rstrip("B").rstrip("I")
    scale = 1024 ** " KMGT".index(prefix) if "I" in unit and prefix else _UNITS[prefix]
    size = int(number * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def _cmd_merge(args: argparse.Namespace) -> int:
    from evoray.config.merge_config import MergeConfig
    from evoray.merge.streaming import merge_to_folder

    config = MergeConfig.from_yaml(args.config)
    out = merge_to_folder(
        config,
        args.out_dir,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        overwrite=args.overwrite,
        max_shard_bytes=args.max_shard_size,
        seed=args.seed,
        progress=not args.quiet,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(f"merged model written to {out}")
    return 0


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from evoray.models.zoo import ZooSpec, build_zoo

    if args.kind == "causal_lm":
        from evoray.models.lm_zoo import LMZooSpec, build_lm_zoo

        lm_zoo = build_lm_zoo(args.root, LMZooSpec(seed=args.seed), force=args.force)
        print(f"base: {lm_zoo.base}")
        for name, path in lm_zoo.experts.items():
            print(f"expert {name}: {path}")
        return 0
    zoo = build_zoo(args.root, ZooSpec(seed=args.seed, n_domains=args.domains), force=args.force)
    print(f"base: {zoo.base}")
    for name, path in zoo.experts.items():
        print(f"expert {name}: {path}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from evoray.config.reading import read_yaml
    from evoray.config.run_config import RunConfig
    from evoray.errors import ConfigError

    path = Path(args.config)
    raw = read_yaml(path, "run config") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    from evoray.config.evolve_config import evolve_to_run_dict, is_evolve_config

    if is_evolve_config(raw):  # a mergekit-evolve file: overrides and snapshot in evoray's form
        raw = evolve_to_run_dict(raw, str(path))
    if args.run_dir:
        raw.setdefault("output", {})["run_dir"] = str(args.run_dir)
    if args.generations is not None:
        from evoray.strategies import get_strategy

        strategy = raw.get("strategy", "evolver")
        key = get_strategy(strategy).generations_key
        raw.setdefault(strategy, {})[key] = args.generations
    if args.gpus_per_worker is not None:
        raw.setdefault("execution", {})["gpus_per_worker"] = args.gpus_per_worker
    config = RunConfig.from_dict(raw, source=str(path))
    # The resolved config next to the results: `evoray resume RUN_DIR` needs nothing else.
    raw.setdefault("output", {})["run_dir"] = str(config.run_dir.resolve())
    config.run_dir.mkdir(parents=True, exist_ok=True)
    snapshot = config.run_dir / "config.yml"
    if not (args.resume and snapshot.exists()):
        snapshot.write_text(yaml.safe_dump(raw, sort_keys=False))
    return _run(config, args, resume=args.resume)


def _cmd_resume(args: argparse.Namespace) -> int:
    from evoray.config.run_config import RunConfig
    from evoray.errors import ConfigError

    snapshot = Path(args.run_dir) / "config.yml"
    if not snapshot.is_file():
        raise ConfigError(
            f"{snapshot} not found: RUN_DIR must be the output.run_dir of an `evoray run`"
        )
    return _run(RunConfig.from_yaml(snapshot), args, resume=True)


def _run(config, args: argparse.Namespace, *, resume: bool) -> int:
    from evoray.execution.tune_runner import ensure_ray, prepare, run_search
    from evoray.report.results import run_table

    shared = prepare(config)  # models and layouts are checked before Ray starts
    ensure_ray(args.address, args.num_cpus)
    summaries = run_search(config, shared=shared, resume=resume, progress=not args.quiet)
    table = run_table(shared.inputs.members, shared.inputs.tasks, summaries)
    (config.run_dir / "results.md").write_text(table + "\n")
    print(table)
    print(f"\nParquet logs, models and results.md are in {config.run_dir}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evoray", description="Merge and fuse language models by population search on Ray."
    )
    parser.add_argument("--version", action="version", version=f"evoray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    m = sub.add_parser(
        "merge",
        help="merge models from a mergekit-format YAML config",
        description="Merge models from a mergekit-format YAML config into an HF folder.",
    )
    m.add_argument("config", help="mergekit-format YAML (merge_method, base_model, models, ...)")
    m.add_argument("out_dir", help="folder to write the merged model to")
    m.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickle (.bin/.pt) weights; only for checkpoints you trust",
    )
    m.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accept models whose config needs custom code (auto_map)",
    )
    m.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT_DIR that an earlier evoray or mergekit merge wrote",
    )
    m.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="merge input tensors that hold NaN or Inf (refused by default)",
    )
    m.add_argument(
        "--max-shard-size",
        type=parse_size,
        default="5GB",
        help="largest safetensors shard (default 5GB)",
    )
    m.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
    m.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_cmd_merge)

    z = sub.add_parser("zoo", help="the embedded model zoo (tiny base + domain experts)")
    zsub = z.add_subparsers(dest="zoo_command", required=True)
    zb = zsub.add_parser(
        "build", help="build (or reuse) the zoo offline; about a minute on 2 cores"
    )
    zb.add_argument("--root", default=None, help="default: $EVORAY_HOME/zoo (~/.cache/evoray/zoo)")
    zb.add_argument("--seed", type=int, default=0)
    zb.add_argument("--domains", type=int, default=4, help="number of in-domain experts (2-5)")
    zb.add_argument("--force", action="store_true", help="rebuild even if cached")
    zb.add_argument(
        "--kind",
        choices=("classifier", "causal_lm"),
        default="classifier",
        help="classifier: BERT domain experts; causal_lm: a Llama base and skill experts",
    )
    zb.set_defaults(func=_cmd_zoo_build)

    r = sub.add_parser(
        "run",
        help="run a search (search_spaces/*.yaml) on Ray Tune",
        description="Run a population search described by a search-space YAML on Ray Tune.",
    )
    r.add_argument("config", help="e.g. search_spaces/evolver.yaml")
    r.add_argument("--run-dir", type=Path, default=None, help="override output.run_dir")
    r.add_argument(
        "--generations",
        type=int,
        default=None,
        help="override the strategy's generations (max_generations, rounds)",
    )
    r.add_argument("--resume", action="store_true", help="continue an interrupted run in run_dir")
    r.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)"
    )
    r.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    r.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help="override execution.gpus_per_worker (e.g. 1: one model per GPU)",
    )
    r.add_argument("-q", "--quiet", action="store_true", help="less Tune output")
    r.set_defaults(func=_cmd_run)

    rs = sub.add_parser(
        "resume",
        help="continue an interrupted `evoray run` from its last finished generation",
    )
    rs.add_argument("run_dir", help="the output.run_dir of the interrupted run")
    rs.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    rs.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray")
    rs.add_argument("-q", "--quiet", action="store_true", help="less Tune output")
    rs.set_defaults(func=_cmd_resume)

    from evoray.fusion.fuse_cli import add_fuse_parser
    from evoray.kinship.cli import add_kinship_parser
    from evoray.report.summary import add_report_parser

    add_kinship_parser(sub)
    add_report_parser(sub)
    add_fuse_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except EvorayError as exc:
        print(f"evoray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"evoray {args.command}: interrupted", file=sys.stderr)
        return 130
