"""Issue 13: what `evoray merge` / `evoray kinship` must never do to a user's files and data.

--overwrite never deletes more than an earlier merge's output, NaN/Inf inputs are refused by
name, a killed merge's temp folder is cleaned by the next merge, and unwritable or full output
locations are one-line errors naming the path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from evoray.cli import main
from evoray.config.merge_config import MergeConfig
from evoray.errors import CheckpointError
from evoray.kinship.matrix import kinship_matrix
from evoray.merge.streaming import merge_to_folder
from evoray.weights import export, output_folder
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.export import ModelFolderWriter
from evoray.weights.output_folder import replace_folder

REPO = Path(__file__).resolve().parents[1]


def write_config(folder: Path, models: list[str], method: str = "linear", **extra) -> Path:
    data = {
        "merge_method": method,
        "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
        **extra,
    }
    path = folder / "merge.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --- 1. --overwrite only replaces an earlier merge's output ----------------------------------


@pytest.fixture
def project(tmp_path, tiny_finetunes) -> Path:
    """A user's folder: two input models, the config and an unrelated file."""
    root = tmp_path / "project"
    root.mkdir()
    for i, src in enumerate(tiny_finetunes[:2]):
        shutil.copytree(src, root / f"model{i}")
    write_config(root, ["model0", "model1"])
    (root / "notes.txt").write_text("mine")
    return root


def test_overwrite_of_the_working_folder_is_refused(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    before = snapshot(project)
    assert main(["merge", "merge.yml", ".", "--overwrite", "-q"]) == 2
    err = capsys.readouterr().err
    assert "Refusing to replace" in err and "running from" in err
    assert snapshot(project) == before  # models, config and notes untouched
    assert [p for p in project.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("out", "needle"),
    [("project", "merge config"), ("project/model0", "input model")],
)
def test_overwrite_of_a_folder_holding_config_or_inputs_is_refused(
    project, monkeypatch, capsys, out, needle
):
    # Even when the folder looks like a merge output (a card tagged evoray), it holds inputs.
    (project / "model0" / "README.md").write_text("---\ntags:\n- evoray\n---\n")
    monkeypatch.chdir(project.parent.parent)  # cwd is not the output
    target = project.parent / out
    before = snapshot(project)
    assert main(["merge", str(project / "merge.yml"), str(target), "--overwrite", "-q"]) == 2
    assert needle in capsys.readouterr().err
    assert snapshot(project) == before


def test_overwrite_of_an_unrelated_folder_is_refused(project, tmp_path, capsys):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main(["merge", str(project / "merge.yml"), str(other), "--overwrite", "-q"]) == 2
    assert "does not look like an earlier merge" in capsys.readouterr().err
    assert (other / "cat.jpg").read_bytes() == b"\xff\xd8"


def test_overwrite_replaces_an_evoray_or_mergekit_output(project, tmp_path):
    cfg = str(project / "merge.yml")
    out = tmp_path / "merged"
    assert main(["merge", cfg, str(out), "-q"]) == 0
    assert output_folder.is_merge_output(out)
    assert main(["merge", cfg, str(out), "--overwrite", "-q"]) == 0
    # what mergekit writes: a card tagged mergekit and mergekit_config.yml
    for name, text in [
        ("README.md", "---\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n---\n# m\n"),
        ("mergekit_config.yml", "merge_method: linear\n"),
    ]:
        mk = tmp_path / f"mergekit-{name}"
        mk.mkdir()
        (mk / name).write_text(text)
        (mk / "model.safetensors").write_bytes(b"old")
        assert main(["merge", cfg, str(mk), "--overwrite", "-q"]) == 0
        assert (mk / "config.json").is_file() and "evoray" in (mk / "README.md").read_text()


def test_replace_folder_never_replaces_the_working_folder(tmp_path, monkeypatch):
    # the same guard for every model folder evoray replaces (fusion's save_model included)
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("keep")
    new = tmp_path / "new"
    new.mkdir()
    monkeypatch.chdir(work)
    for dest in (work, tmp_path):
        with pytest.raises(CheckpointError, match="running from"):
            replace_folder(new, dest)
    assert (work / "data.txt").read_text() == "keep" and new.is_dir()


# --- 3. NaN / Inf inputs --------------------------------------------------------------------


@pytest.fixture
def nan_model(tmp_path, tiny_finetunes) -> Path:
    folder = tmp_path / "nan-model"
    shutil.copytree(tiny_finetunes[1], folder)
    tensors = load_file(str(folder / "model.safetensors"))
    t = tensors["model.layers.0.mlp.up_proj.weight"]
    t.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("method", ["linear", "ties", "task_arithmetic"])
def test_nonfinite_input_is_refused_by_name(tmp_path, tiny_base, tiny_finetunes, nan_model, method):
    models = [str(tiny_finetunes[0]), str(nan_model)]
    extra = {} if method == "linear" else {"base_model": str(tiny_base)}
    if method == "ties":
        extra["parameters"] = {"density": 0.5}
    cfg = MergeConfig.from_yaml(write_config(tmp_path, models, method, **extra))
    with pytest.raises(CheckpointError) as exc:
        merge_to_folder(cfg, tmp_path / "out")
    msg = str(exc.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "3 non-finite" in msg
    assert str(nan_model / "model.safetensors") in msg and "--allow-nonfinite" in msg
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_allow_nonfinite_merges_anyway(tmp_path, tiny_finetunes, nan_model, capsys):
    cfg = write_config(tmp_path, [str(tiny_finetunes[0]), str(nan_model)])
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q", "--allow-nonfinite"]) == 0
    with open_checkpoint(tmp_path / "out") as c:
        assert not torch.isfinite(c.get("model.layers.0.mlp.up_proj.weight")).all()


def test_kinship_refuses_nonfinite_weights(tiny_base, tiny_finetunes, nan_model, tmp_path, capsys):
    models = [str(tiny_finetunes[0]), str(nan_model)]
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*3 non-finite"):
        kinship_matrix(tiny_base, models, parallel=False)
    png = str(tmp_path / "k.png")
    argv = ["kinship", str(tiny_base), *models, "--no-parallel", "--png", png]
    assert main(argv) == 2
    assert "non-finite" in capsys.readouterr().err
    assert main([*argv, "--allow-nonfinite"]) == 0  # asked for: computed, shown as nan
    assert "nan" in capsys.readouterr().out


def test_kinship_ray_tasks_refuse_nonfinite_weights(
    tiny_base, tiny_finetunes, nan_model, ray_local
):
    models = [str(tiny_finetunes[0]), str(nan_model)]
    with pytest.raises(CheckpointError, match=r"up_proj\.weight.*3 non-finite"):
        kinship_matrix(tiny_base, models, parallel=True)
    res = kinship_matrix(tiny_base, models, parallel=True, allow_nonfinite=True)
    assert not torch.isfinite(torch.as_tensor(res.matrix("cosine"))).all()


# --- 4. a killed merge's hidden temp folder -------------------------------------------------

_KILLED_WRITER = """
import os, signal, sys, torch
from evoray.weights.export import ModelFolderWriter
w = ModelFolderWriter(sys.argv[1], max_shard_bytes=1000)
for i in range(4):
    w.add(f"t{i}", torch.ones(300))  # flushes shards into the temp folder
print(w.tmp_dir, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_next_merge_removes_the_temp_folder_of_a_killed_one(tmp_path, project):
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    leftover = Path(proc.stdout.strip())
    assert leftover.parent == tmp_path and leftover.name.startswith(".merged.tmp-")
    assert any(leftover.glob("*.safetensors"))
    # a live writer's temp folder (this process) and another host's are left alone
    live = tmp_path / f".merged.tmp-{output_folder.HOST}-{os.getpid()}-0123abcd"
    remote = tmp_path / ".merged.tmp-otherhost-1-0123abcd"
    unrelated = tmp_path / ".other.tmp-x-1-0123abcd"
    for d in (live, remote, unrelated):
        d.mkdir()
    assert main(["merge", str(project / "merge.yml"), str(out), "-q"]) == 0
    assert not leftover.exists()
    assert live.is_dir() and remote.is_dir() and unrelated.is_dir()
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".merged"))
    assert hidden == sorted([live.name, remote.name])


# --- 8. unwritable and full output locations ------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_output_is_one_line_naming_the_path(project, capsys):
    assert main(["merge", str(project / "merge.yml"), "/proc/evoray-out", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "/proc/evoray-out" in err and "choose" in err


def test_full_disk_is_one_line_and_leaves_nothing(project, tmp_path, monkeypatch, capsys):
    def full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    monkeypatch.setattr(export, "save_file", full)
    out = tmp_path / "merged"
    assert main(["merge", str(project / "merge.yml"), str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "disk is full" in err and str(tmp_path) in err
    assert not out.exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


def test_full_disk_while_copying_support_files(tmp_path, tiny_base, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export.shutil, "copyfile", full)
    with (
        pytest.raises(CheckpointError, match="disk is full"),
        ModelFolderWriter(tmp_path / "o") as w,
    ):
        w.add("w", torch.ones(2))
        w.copy_support_files(tiny_base, dtype=None)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--png", "/proc/evoray-k.png", "/proc/evoray-k.png"),
        ("--json", "/proc/evoray/k.json", "/proc/evoray/k.json"),
        ("--png", "kinship.bogus", ".png"),
    ],
)
def test_kinship_output_errors_are_one_line(
    tiny_base, tiny_finetunes, tmp_path, monkeypatch, capsys, flag, value, needle
):
    monkeypatch.chdir(tmp_path)
    argv = ["kinship", str(tiny_base), *map(str, tiny_finetunes[:2]), "--no-parallel"]
    assert main([*argv, flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and ("choose" in err or "ending in" in err)
