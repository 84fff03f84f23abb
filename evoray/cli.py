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
    from evoray.config.run_config import RunConfig, resolve_paths
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
    # Paths against the directory the user ran from, before Ray starts: Tune runs each trial
    # in a working directory of its own, and `evoray resume` may run from anywhere.
    raw = resolve_paths(raw, config_dir=path.parent)
    config = RunConfig.from_dict(raw, source=str(path))
    raw.setdefault("output", {})["run_dir"] = str(config.run_dir)
    snapshot = config.run_dir / "config.yml"
    if not args.resume:
        _claim_run_dir(config, path, overwrite=args.overwrite)
    _writable_run_dir(config.run_dir)
    # The resolved config next to the results: `evoray resume RUN_DIR` needs nothing else.
    if not (args.resume and snapshot.exists()):
        _write_run_file(snapshot, yaml.safe_dump(raw, sort_keys=False))
    return _run(config, args, resume=args.resume)


# What `evoray run` writes into output.run_dir; --overwrite removes these and nothing else.
RUN_ENTRIES = ("config.yml", "results.md", "runs", "tune", "stats-cache")


def _claim_run_dir(config, config_path: Path, *, overwrite: bool) -> None:
    """A new run must not mix its trials into an earlier run's folder (nor overwrite that
    run's config.yml): refuse, or with ``overwrite`` remove the earlier run's files, only
    those `evoray run` writes, and only when its config.yml shows evoray wrote them."""
    import shutil

    import yaml

    from evoray.errors import ConfigError

    run_dir = config.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output.run_dir {run_dir} is a file; choose a folder (--run-dir)")
    present = [run_dir / n for n in RUN_ENTRIES if (run_dir / n).exists()]
    if not present:
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in present)
    snapshot = run_dir / "config.yml"
    try:
        ours = yaml.safe_load(snapshot.read_text()) if snapshot.is_file() else None
    except (OSError, yaml.YAMLError):
        ours = None
    written_by_evoray = (
        isinstance(ours, dict)
        and "strategy" in ours
        and isinstance(ours.get("output"), dict)
        and Path(str(ours["output"].get("run_dir", ""))).resolve() == run_dir.resolve()
    )
    if not written_by_evoray:
        raise ConfigError(
            f"output.run_dir {run_dir} already holds {names} but no config.yml written by "
            "`evoray run`, so evoray will neither mix a new run into it nor delete it; choose "
            "another folder (--run-dir NEW_DIR)"
        )
    if [p.name for p in present] == ["config.yml"]:
        return  # an earlier attempt stopped before any trial ran: nothing to mix or lose
    if not overwrite:
        raise ConfigError(
            f"output.run_dir {run_dir} already holds a run ({names}). Continue it with "
            f"`evoray resume {run_dir}`, start a new one elsewhere with --run-dir NEW_DIR, or "
            "pass --overwrite to delete that run's results first"
        )
    inputs = [config_path, *config.models.members]
    if config.models.base:
        inputs.append(config.models.base)
    if config.models.zoo and config.models.zoo.get("root"):
        inputs.append(config.models.zoo["root"])
    for entry in present:
        for item in inputs:
            item_path = Path(item).expanduser().absolute()
            if item_path == entry.absolute() or entry.absolute() in item_path.parents:
                raise ConfigError(
                    f"--overwrite would delete {item} (an input of this run), which lies in "
                    f"{entry}; copy it elsewhere first, or choose another folder (--run-dir)"
                )
    for entry in present:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _writable_run_dir(run_dir: Path) -> None:
    """ConfigError naming output.run_dir when it cannot be created or written (a read-only
    or system folder, a full disk), before any work starts."""
    import tempfile

    from evoray.errors import ConfigError

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".evoray-write-test-"):
            pass
    except OSError as exc:
        raise ConfigError(
            f"output.run_dir {run_dir} is not writable ({exc.strerror or exc}); choose a "
            "folder you can write to with --run-dir"
        ) from None


def _write_run_file(path: Path, text: str) -> None:
    from evoray.errors import ConfigError

    try:
        path.write_text(text)
    except OSError as exc:
        raise ConfigError(
            f"cannot write {path} ({exc.strerror or exc}); free space in output.run_dir or "
            "choose another folder with --run-dir"
        ) from None


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
    from evoray.execution.tune_runner import RunInterrupted, ensure_ray, prepare, run_search
    from evoray.report.results import run_table

    quiet = args.quiet and not getattr(args, "verbose", False)  # -v brings Tune's output back
    try:
        # models and layouts are checked before Ray starts
        shared = prepare(
            config,
            allow_pickle=getattr(args, "allow_pickle", False),
            trust_remote_code=getattr(args, "trust_remote_code", False),
        )
        ensure_ray(args.address, args.num_cpus, dashboard=not args.no_dashboard, quiet=quiet)
        summaries = run_search(config, shared=shared, resume=resume, progress=not quiet)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before Tune took over
        raise RunInterrupted(config.run_dir) from None
    table = run_table(shared.inputs.members, shared.inputs.tasks, summaries)
    _write_run_file(config.run_dir / "results.md", table + "\n")
    print(table)
    print(f"\nParquet logs, models and results.md are in {config.run_dir}/")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """Options `evoray run` and `evoray resume` share."""
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or local)"
    )
    p.add_argument(
        "--num-cpus",
        type=_non_negative_int,
        default=None,
        help="CPUs for a local Ray (default: all)",
    )
    p.add_argument(
        "--no-dashboard",
        action="store_true",
        help="start a local Ray without its dashboard (default: on, at 127.0.0.1)",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickle (.bin/.pt) members and base; only for checkpoints you trust",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow models whose config needs their own Python code (auto_map)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="results and a progress line only")
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,  # keep `evoray -v run ...` working
        help="Tune's own output (with -q too) and debug messages",
    )


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


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
        "--overwrite",
        action="store_true",
        help="replace the earlier run in run_dir (only the files `evoray run` wrote there)",
    )
    r.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        help=(
            "override execution.gpus_per_worker (1: one model per GPU; 0.25: four workers "
            "share a GPU; 2: each worker spreads its model over two GPUs)"
        ),
    )
    _add_run_options(r)
    r.set_defaults(func=_cmd_run)

    rs = sub.add_parser(
        "resume",
        help="continue an interrupted `evoray run` from its last finished generation",
    )
    rs.add_argument("run_dir", help="the output.run_dir of the interrupted run")
    _add_run_options(rs)
    rs.set_defaults(func=_cmd_resume)

    from evoray.fusion.fuse_cli import add_fuse_parser
    from evoray.kinship.cli import add_kinship_parser
    from evoray.report.summary import add_report_parser

    add_kinship_parser(sub)
    add_report_parser(sub)
    add_fuse_parser(sub)
    return parser


def _missing_flag_note(parser: argparse.ArgumentParser, command: str, message: str) -> str:
    """Messages come from shared code (``--allow-pickle`` from the checkpoint reader); where
    one suggests a flag ``evoray COMMAND`` lacks, say so, and which commands have it."""
    subs = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    if subs is None or command not in subs.choices:
        return ""
    own = subs.choices[command]._option_string_actions
    notes = []
    for flag in dict.fromkeys(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", message)):
        if flag in own:
            continue
        others = [name for name, p in subs.choices.items() if flag in p._option_string_actions]
        where = f"; {', '.join(f'`evoray {o}`' for o in others)} has it" if others else ""
        notes.append(f"`evoray {command}` has no {flag} option{where}")
    return f" (note: {'; '.join(notes)})" if notes else ""


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
        text = str(exc) + _missing_flag_note(parser, args.command, str(exc))
        print(f"evoray {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        run_dir = getattr(exc, "run_dir", None)
        hint = f"; continue with: evoray resume {run_dir}" if run_dir is not None else ""
        print(f"evoray {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
