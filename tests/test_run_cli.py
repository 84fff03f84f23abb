"""`evoray run` as a user runs it: a subprocess from another directory (issue 13)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from evoray.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def project(tmp_path: Path, zoo, generations: int = 2) -> Path:
    """A user's folder: models copied in, a config naming them by relative paths."""
    proj = tmp_path / "proj"
    (proj / "models").mkdir(parents=True)
    for name, path in {"base": zoo.base, **zoo.experts}.items():
        shutil.copytree(path, proj / "models" / name)
    config = {
        "strategy": "evolver",
        "models": {"base": "models/base", "members": [f"models/{n}" for n in zoo.experts]},
        "tasks": {"kind": "zoo", "n_domains": len(zoo.experts)},
        "evolver": {"generations": generations, "seed": 1},
        "execution": {"num_workers": 1},
        "output": {"run_dir": "out/run"},
    }
    (proj / "s.yml").write_text(yaml.safe_dump(config))
    return proj


def evoray(proj: Path, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "evoray", "run", "s.yml", "--num-cpus", "2", *args],
        cwd=proj,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def test_quiet_run_with_relative_paths_then_a_rerun_is_refused(tmp_path, small_zoo):
    proj = project(tmp_path, small_zoo)
    out, err = evoray(proj, "-q").communicate(timeout=400)
    run = proj / "out" / "run"
    assert "Traceback" not in err, err
    (trial,) = (run / "runs").iterdir()
    # item 9: the trial (in Tune's own working directory) found the members at the end
    assert (trial / "summary.json").is_file() and (trial / "model" / "config.json").is_file()
    snapshot = yaml.safe_load((run / "config.yml").read_text())
    assert all(Path(m).is_absolute() for m in snapshot["models"]["members"])
    # item 12: the dashboard, on 127.0.0.1, its URL printed
    assert "Ray dashboard: http://127.0.0.1:" in out
    # item 11: -q is the results, a progress line and nothing of Tune's
    for noise in ("Checkpoint successfully", "snapshotting", "Configuration for experiment"):
        assert noise not in out + err
    assert "generation 2/2" in err and "| Evolver" in out
    assert len((out + err).strip().splitlines()) <= 14, out + err

    # item 4: a second run into the same run_dir is refused, the first run untouched
    before = (run / "config.yml").read_text()
    assert main(["run", str(proj / "s.yml"), "--run-dir", str(run), "--no-dashboard"]) == 2
    assert (run / "config.yml").read_text() == before and trial.is_dir()
    # --overwrite removes only the files evoray wrote
    (run / "notes.txt").write_text("mine")
    members = snapshot["models"]["members"]
    from evoray.cli import _claim_run_dir
    from evoray.config.run_config import RunConfig

    config = RunConfig.from_yaml(run / "config.yml")
    _claim_run_dir(config, proj / "s.yml", overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert all(Path(m).is_dir() for m in members)


def test_rerun_refusal_messages(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "runs").mkdir(parents=True)
    cfg = tmp_path / "s.yml"
    cfg.write_text(yaml.safe_dump({"models": {"zoo": {}}, "output": {"run_dir": str(run)}}))
    # a folder evoray did not write (no snapshot): never mixed into, never deleted
    assert main(["run", str(cfg), "--overwrite"]) == 2
    assert "no config.yml written by `evoray run`" in capsys.readouterr().err
    assert (run / "runs").is_dir()
    snap = {"strategy": "evolver", "models": {"zoo": {}}, "output": {"run_dir": str(run)}}
    (run / "config.yml").write_text(yaml.safe_dump(snap))
    (run / "runs").rmdir()  # an attempt that failed before any trial ran is no run to keep
    from evoray.cli import _claim_run_dir
    from evoray.config.run_config import RunConfig

    _claim_run_dir(RunConfig.from_dict(snap), cfg, overwrite=False)  # no error
    (run / "runs").mkdir()
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"evoray resume {run}" in err and "--overwrite" in err
    # --overwrite never deletes the config being run
    assert main(["run", str(run / "config.yml"), "--overwrite"]) == 2
    assert "an input of this run" in capsys.readouterr().err
    assert (run / "config.yml").is_file()


def test_unwritable_run_dir_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "s.yml"
    cfg.write_text(yaml.safe_dump({"models": {"zoo": {}}}))
    assert main(["run", str(cfg), "--run-dir", "/proc/evoray-run"]) == 2
    err = capsys.readouterr().err
    assert "output.run_dir /proc/evoray-run is not writable" in err and "--run-dir" in err
    assert len(err.strip().splitlines()) == 1


def test_messages_suggesting_a_flag_the_command_lacks_say_so():
    from evoray.cli import _missing_flag_note

    parser = build_parser()
    msg = "x.bin is a pickle checkpoint; pass --allow-pickle only if you trust it"
    assert _missing_flag_note(parser, "run", msg) == ""  # `run` has it now
    assert _missing_flag_note(parser, "merge", msg) == ""
    note = _missing_flag_note(parser, "fuse", msg)
    assert "`evoray fuse` has no --allow-pickle option" in note and "`evoray run`" in note
    args = parser.parse_args(["run", "c.yml", "--allow-pickle", "--no-dashboard", "-q", "-v"])
    assert args.allow_pickle and args.no_dashboard and args.quiet and args.verbose
    assert parser.parse_args(["-v", "resume", "d"]).verbose  # the global -v still works
    assert parser.parse_args(["fuse", "c.yml", "--no-dashboard"]).no_dashboard


def test_ctrl_c_exits_130_with_the_resume_command(tmp_path, small_zoo):
    proj = project(tmp_path, small_zoo, generations=200)
    proc = evoray(proj, "-q", "--no-dashboard", start_new_session=True)
    log = proj / "out" / "run" / "runs"
    deadline = time.monotonic() + 300
    while not list(log.glob("*/log/gen-000000.parquet")) and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"continue with: evoray resume {proj / 'out' / 'run'}" in err
    assert "Traceback" not in err and "Tuner.restore" not in err


def test_run_accepts_the_allow_pickle_its_message_suggests(tmp_path, small_zoo, capsys):
    from tests.factories import _safetensors_to_pickle

    proj = project(tmp_path, small_zoo)
    member = proj / "models" / next(iter(small_zoo.experts))
    _safetensors_to_pickle(member)
    args = [str(proj / "s.yml"), "--run-dir", str(tmp_path / "r"), "--no-dashboard"]
    cwd = os.getcwd()
    os.chdir(proj)
    try:
        assert main(["run", *args]) == 2  # refused before Ray starts
        err = capsys.readouterr().err
        assert "--allow-pickle" in err and "has no --allow-pickle" not in err
        from evoray.config.run_config import RunConfig
        from evoray.execution.tune_runner import prepare

        shared = prepare(RunConfig.from_yaml(proj / "s.yml"), allow_pickle=True)
    finally:
        os.chdir(cwd)
    assert shared.inputs.models.allow_pickle and str(member) in shared.inputs.members
    assert shared.worker.allow_pickle  # the workers read the pickle member too
