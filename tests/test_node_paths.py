"""Paths that exist only on the driver are named before a cluster run starts.

A real two-node Ray cluster on loopback, whose second node runs in a private mount namespace
with an empty tmpfs over the data folder: the file truly exists for the driver and the head
but not for that node, as on a cluster without shared storage.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from evoray.execution.node_paths import config_paths
from tests.test_cluster_submit import (
    RAY,
    VENV_BIN,
    Cluster,
    _free_ports,
    _node_options,
    _stop_cluster,
)

ROOT = Path(__file__).resolve().parent.parent


def _can_unshare() -> str | None:
    if not shutil.which("unshare"):
        return "no unshare command"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --make-rprivate / && mount -t tmpfs none /mnt"],
        capture_output=True,
        text=True,
    )
    return None if probe.returncode == 0 else f"private mounts not permitted: {probe.stderr}"


def test_config_paths_name_fields_and_skip_hub_ids(tmp_path):
    from evoray.config.run_config import RunConfig

    (tmp_path / "dev.jsonl").write_text('{"text": "a b c"}\n')
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    config = RunConfig.from_dict(
        {
            "models": {"members": ["m1", "m2"], "base": "org/hub-base"},
            "tasks": [{"name": "t", "kind": "text", "data": {"dev": "dev.jsonl"}}],
            "output": {"run_dir": "runs/x"},
        },
        cwd=tmp_path,
        config_dir=tmp_path,
    )
    fields = dict(config_paths(config))
    assert fields["models.members[0]"] == str(tmp_path / "m1")
    assert fields["tasks[0].data.dev"] == str(tmp_path / "dev.jsonl")
    assert "models.base" not in fields  # a hub id: nothing on disk to check
    assert "output.run_dir" not in fields  # not created yet


@pytest.mark.cluster
def test_path_only_on_the_driver_is_named_before_the_run(tmp_path_factory):
    why = _can_unshare()
    if why:
        pytest.skip(why)
    tmp = Path(tempfile.mkdtemp(prefix="evnp-", dir="/tmp"))  # short: Ray's socket paths
    data = tmp / "data"
    data.mkdir()
    (data / "dev.jsonl").write_text('{"text": "a b c"}\n')
    shared = tmp / "shared.jsonl"
    shared.write_text('{"text": "a b c"}\n')
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_TMPDIR=str(tmp / "ray"),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    gcs, *agents = _free_ports(7)
    cluster = Cluster(tmp, gcs, "", env)
    try:
        cluster.checked(
            "start", "--head", f"--port={gcs}", "--include-dashboard=false",
            *_node_options(tmp / "ray", agents[:3]),
        )  # fmt: skip
        node = [str(RAY), "start", f"--address=127.0.0.1:{gcs}"]
        node += _node_options(tmp / "ray2", agents[3:6])
        hidden = f"mount --make-rprivate / && mount -t tmpfs none {data} && exec "
        subprocess.run(
            ["unshare", "-m", "sh", "-c", hidden + " ".join(node)],
            env=env, check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        cluster.wait_for_nodes(2)
        script = textwrap.dedent(
            f"""
            import ray
            from evoray.errors import ConfigError
            from evoray.execution.node_paths import check_paths_on_nodes
            ray.init(address="127.0.0.1:{gcs}", logging_level="ERROR")
            check_paths_on_nodes([("tasks[1].data.test", {str(shared)!r})], source="c.yml")
            print("SHARED OK")
            try:
                check_paths_on_nodes(
                    [("tasks[0].data.dev", {str(data / "dev.jsonl")!r}),
                     ("tasks[1].data.test", {str(shared)!r})],
                    source="c.yml",
                )
            except ConfigError as e:
                print("ERROR:", e)
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert "SHARED OK" in out.stdout, out.stdout + out.stderr
        err = out.stdout.split("ERROR:", 1)[1]
        assert err.startswith(" c.yml: paths that exist on this machine are missing")
        # The one node without it, by address and node id; the head (same mounts) has it.
        line = re.search(r"tasks\[0\]\.data\.dev: (\S+) is missing on (\S+) \((\w{8})\)\n", err)
        assert line and line[1] == str(data / "dev.jsonl"), err
        assert "tasks[1].data.test" not in err  # present on both nodes
        assert "storage every node mounts at the same path" in err
    finally:
        _stop_cluster(tmp, gcs)
        shutil.rmtree(tmp, ignore_errors=True)
