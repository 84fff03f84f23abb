"""The driver dies mid-run; `evoray resume RUN_DIR` finishes it with the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from evoray.runlog import read_log
from tests.conftest import SMALL_ZOO


def evoray(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "evoray", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: we kill the driver and its local Ray
        **kw,
    )


def test_killed_driver_resumes_to_the_same_final_population(tmp_path, small_zoo):
    config = {
        "strategy": "evolver",
        "models": {"zoo": {**SMALL_ZOO, "root": str(small_zoo.root.parent)}},
        "evolver": {"generations": 4, "seed": 7, "merger": "average"},
        "execution": {"num_workers": 1},
    }
    cfg = tmp_path / "search.yml"
    cfg.write_text(yaml.safe_dump(config))

    # Reference: the same search, uninterrupted.
    ref = evoray("run", str(cfg), "--run-dir", str(tmp_path / "ref"), "--num-cpus", "2", "-q")
    out, _ = ref.communicate(timeout=300)
    assert ref.returncode == 0, out

    # Interrupted: SIGKILL the driver (and its whole process group) after generation 1.
    run_dir = tmp_path / "run"
    proc = evoray("run", str(cfg), "--run-dir", str(run_dir), "--num-cpus", "2", "-q")
    deadline = time.monotonic() + 240
    while not list(run_dir.glob("runs/*/log/gen-000001.parquet")):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "generation 1 never finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not list(run_dir.glob("runs/*/summary.json"))  # it really was cut short

    resumed = evoray("resume", str(run_dir), "--num-cpus", "2", "-q")
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out

    def result(d: Path) -> tuple:
        (trial,) = (d / "runs").iterdir()
        summary = yaml.safe_load((trial / "summary.json").read_text())
        log = read_log(trial)
        return summary, log

    ref_summary, ref_log = result(tmp_path / "ref")
    summary, log = result(run_dir)
    assert summary["best_dev_fitness"] == ref_summary["best_dev_fitness"]
    assert summary["test"] == ref_summary["test"]
    # every generation logged exactly once, with the same offspring and decisions
    assert len(log) == len(ref_log) == 4 * len(small_zoo.experts)
    cols = ["generation", "individual", "seed", "fitness", "accepted"]
    assert log[cols].reset_index(drop=True).equals(ref_log[cols].reset_index(drop=True))
    ref_model = (tmp_path / "ref" / "runs").iterdir().__next__() / "model" / "model.safetensors"
    model = next((run_dir / "runs").iterdir()) / "model" / "model.safetensors"
    assert model.read_bytes() == ref_model.read_bytes()
