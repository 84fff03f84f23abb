"""`clusters/`: the launch files parse and point at this repo, and `clusters/submit.sh` runs a
real search as a Ray job on a two-node Ray cluster started on this machine.

The cluster is two `ray start` processes (head and one worker node, one CPU each) with their own
temp dir, ports and auth token, all driven as subprocesses: the session's in-process Ray
(`ray_local`) is never touched, and only processes of this cluster are stopped afterwards
(`ray stop` would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from evoray.cli import build_parser
from evoray.config.run_config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
TINY = "search_spaces/tiny_cluster.yaml"


# -- the launch files ---------------------------------------------------------------------------


def _evoray_run_args(command: str) -> list[str]:
    """The `evoray run ...` arguments of a `python -m evoray run ...` command line."""
    words = shlex.split(command)
    start = words.index("evoray")
    assert words[start - 2 : start] == ["python", "-m"], command
    return words[start + 1 :]


def test_kuberay_rayjob_runs_a_shipped_search_space():
    import ray

    job = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    args = build_parser().parse_args(_evoray_run_args(spec["entrypoint"]))
    assert args.command == "run" and args.config == "search_spaces/evolver.yaml"
    RunConfig.from_yaml(ROOT / args.config)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "excludes", "env_vars"}
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__  # the Ray that evoray is tested with
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    assert any(
        "nvidia.com/gpu" in c["resources"]["limits"]
        for g in cluster["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    # Multi-node Tune needs shared storage: run_dir and the zoo on one volume every pod mounts.
    assert str(args.run_dir).startswith("/mnt/shared/")
    for group in pods:
        pod = group["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        (container,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert claims[mounts["/mnt/shared"]] == "evoray-shared"
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["EVORAY_HOME"].startswith("/mnt/shared/")


def test_aws_launcher_config_is_valid_for_ray_and_installs_this_repo():
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS / "aws.yaml").read_text())
    config = prepare_config(raw)
    validate_config(config)  # Ray's own schema for `ray up`
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert set(types) >= {config["head_node_type"], "gpu_worker"}
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    # The repo is mounted from the directory `ray up` runs in (the root) and pip-installed.
    (target,) = [t for t, src in raw["file_mounts"].items() if src == "."]
    setup = "\n".join(raw["setup_commands"])
    assert re.search(rf"pip install (-q )?-e {target}$", setup, re.M)
    # The same torch pin as the Makefile, and the same Ray as the machine that submits.
    torch_spec = re.search(r"^TORCH_SPEC \?= (\S+)", (ROOT / "Makefile").read_text(), re.M)[1]
    assert f"pip install -q '{torch_spec}' --index-url https://download.pytorch.org/" in setup
    assert f"'ray[default,tune]=={ray.__version__}'" in setup
    head = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "--dashboard-port=8265" in head


def test_submit_script_is_valid_bash_and_runs_evoray():
    script = CLUSTERS / "submit.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    # A dry run: `echo` stands in for `ray`, to show the command line it builds.
    mine = ("RAY_DASHBOARD_ADDRESS", "SUBMIT_ARGS", "RUNTIME_ENV_JSON")
    env = {k: v for k, v in os.environ.items() if k not in mine}
    env.update(RAY="echo", EVORAY_CLUSTER_HOME="/mnt/shared/evoray")
    out = subprocess.run(
        ["bash", str(script), TINY, "--run-dir", "/mnt/shared/runs/t"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    before, entry = out.split(" -- ")
    assert before.startswith("job submit --address http://127.0.0.1:8265 --working-dir .")
    runtime_env = json.loads(before.split("--runtime-env-json ", 1)[1])
    assert runtime_env["env_vars"]["EVORAY_HOME"] == "/mnt/shared/evoray"
    assert {".venv", "runs", ".git"} <= set(runtime_env["excludes"])
    args = build_parser().parse_args(_evoray_run_args(entry))
    assert (args.config, args.address, str(args.run_dir)) == (TINY, "auto", "/mnt/shared/runs/t")
    missing = subprocess.run(["bash", str(script), "nope.yaml"], env=env, capture_output=True)
    assert missing.returncode == 2


def test_tiny_cluster_search_space():
    config = RunConfig.from_yaml(ROOT / TINY)
    assert config.models.zoo["hidden_size"] == 32 and config.settings["generations"] == 2
    assert config.execution.num_workers == 2 and config.execution.cpus_per_worker == 1


# -- a real two-node cluster on loopback ----------------------------------------------------------


@dataclass
class Cluster:
    tmp: Path  # everything of this cluster: temp dirs, auth token, outputs
    gcs_port: int
    address: str  # the dashboard / job API
    env: dict[str, str]  # environment for `ray` commands against it
    status: str = ""

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(RAY), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def checked(self, *args: str) -> str:
        proc = self.ray(*args)
        assert proc.returncode == 0, f"ray {shlex.join(args)}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def state(self, kind: str, *options: str) -> list[dict]:
        """`ray list KIND` (the state API keeps finished actors too)."""
        args = ("list", kind, f"--address={self.address}", "--format=json", "--limit=1000")
        return json.loads(self.checked(*args, *options))

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.status = self.ray("status", f"--address=127.0.0.1:{self.gcs_port}").stdout
            active = self.status.split("Active:", 1)[-1].split("Pending:", 1)[0]
            if len(re.findall(r"\bnode_[0-9a-f]+", active)) >= n:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the cluster did not reach {n} nodes:\n{self.status}")
            time.sleep(1)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _node_options(temp_dir: Path, ports: list[int]) -> list[str]:
    """Options every node needs to share a host with another one: its own temp dir (nodes
    sharing one share a runtime_resources folder, and one node's agent deletes the job's
    working dir under the other's feet) and its own agent ports (the defaults collide)."""
    listen, runtime_env, metrics = ports
    return [
        f"--temp-dir={temp_dir}",
        f"--dashboard-agent-listen-port={listen}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        "--min-worker-port=0",  # workers on ports the OS picks
        "--max-worker-port=0",
        "--num-cpus=1",
        "--num-gpus=0",
        "--disable-usage-stats",
    ]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry)] = (ppid, cmd)
    return out


def _cluster_pids(tmp: Path, gcs_port: int) -> set[int]:
    """Processes of the cluster this test started: those naming its folder or GCS port on
    their command line (GCS, raylets, dashboard, client server, log monitors) and all their
    descendants (workers and agents, which rename themselves `ray::...`)."""
    procs = _processes()
    port = re.compile(rf":{gcs_port}\b")
    chosen = {p for p, (_, cmd) in procs.items() if str(tmp) in cmd or port.search(cmd)}
    while True:
        children = {p for p, (ppid, _) in procs.items() if ppid in chosen} - chosen
        if not children:
            break
        chosen |= children
    chosen.discard(os.getpid())
    return chosen


def _stop_cluster(tmp: Path, gcs_port: int) -> None:
    """`ray stop --force` for this cluster's processes only (`ray stop` stops every Ray on
    the machine, the session's in-process one and other users' included)."""
    for _ in range(5):
        pids = _cluster_pids(tmp, gcs_port)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


@pytest.fixture(scope="module")
def loopback_cluster():
    """A head and one worker node, one CPU each, on this machine; dashboard on 127.0.0.1."""
    from ray._private.utils import get_dashboard_dependency_error, get_ray_client_dependency_error

    if get_dashboard_dependency_error() is not None:
        pytest.fail(
            "`ray job submit` needs the Ray dashboard: install ray[default] "
            f"({get_dashboard_dependency_error()})"
        )
    # A short path: Ray's unix sockets live under the temp dir (at most 107 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="evrc-", dir="/tmp"))
    token = tmp / "auth_token"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python`: the venv's
        RAY_TMPDIR=str(tmp / "ray"),
        # Token auth with a token of its own (Ray 2.60 turns it on for a head started while
        # ~/.ray/auth_token exists, and the other nodes must then know).
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
    )
    gcs, dashboard, client, *agents = _free_ports(9)
    cluster = Cluster(tmp, gcs, f"http://127.0.0.1:{dashboard}", env)
    head = [
        "start",
        "--head",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        *_node_options(tmp / "ray", agents[:3]),
    ]
    if get_ray_client_dependency_error() is None:  # ray[client] installed: a client server
        head.append(f"--ray-client-server-port={client}")
    try:
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        cluster.checked(*head)
        cluster.checked(
            "start", f"--address=127.0.0.1:{gcs}", *_node_options(tmp / "ray2", agents[3:6])
        )
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        _stop_cluster(tmp, gcs)
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_repo(dest: Path) -> None:
    """The parts of the repo a job needs, as a stand-alone working dir."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("evoray", "search_spaces", "clusters"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", ".gitignore"):
        shutil.copy2(ROOT / name, dest / name)


def test_ray_job_submit_runs_a_search_on_a_two_node_cluster(loopback_cluster: Cluster):
    from transformers import AutoModelForSequenceClassification

    from evoray.runlog import read_log

    cluster = loopback_cluster
    src, run_dir = cluster.tmp / "src", cluster.tmp / "run"
    _copy_repo(src)
    submission = f"evoray-test-{secrets.token_hex(4)}"
    env = {
        **cluster.env,
        "RAY": str(RAY),
        "RAY_DASHBOARD_ADDRESS": cluster.address,
        "EVORAY_CLUSTER_HOME": str(cluster.tmp / "home"),  # the driver builds the zoo there
        "SUBMIT_ARGS": f"--submission-id {submission}",
    }
    t0 = time.perf_counter()
    try:
        job = subprocess.run(
            ["bash", "clusters/submit.sh", TINY, "--run-dir", str(run_dir), "-q"],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as exc:
        logs = cluster.ray("job", "logs", submission, f"--address={cluster.address}").stdout
        raise AssertionError(f"the job timed out; its log:\n{logs[-6000:]}") from exc
    job_s = time.perf_counter() - t0
    assert job.returncode == 0, f"the job failed:\n{job.stdout[-6000:]}\n{job.stderr[-3000:]}"
    status = cluster.checked("job", "status", submission, f"--address={cluster.address}")
    assert "succeeded" in status.lower(), status

    # Every generation is in the Parquet log, and the answer is a model transformers loads.
    (trial,) = (run_dir / "runs").iterdir()
    log = read_log(trial)
    n_experts = 3
    assert sorted(log.generation.unique()) == [0, 1]
    assert len(log) == 2 * n_experts
    assert set(log.device) == {"cpu"} and (log.node.str.len() > 0).all()
    assert (run_dir / "results.md").is_file() and (trial / "summary.json").is_file()
    model = AutoModelForSequenceClassification.from_pretrained(trial / "model")
    assert model.config.num_labels == 2

    # The two offspring workers ran one on each node (one CPU per node, one CPU per worker).
    # The log's `node` column is the hostname, the same for both nodes here: ask Ray instead.
    workers = cluster.state("actors", "--detail", "--filter=class_name=OffspringWorker")
    nodes = {n["node_id"] for n in cluster.state("nodes")}
    per_node = {n: sum(w["node_id"] == n for w in workers) for n in nodes}
    assert list(per_node.values()) == [1, 1], (per_node, cluster.status)
    print(f"\njob {job_s:.1f} s; node column {sorted(set(log.node))}; workers per node {per_node}")


FUSE_TINY = """\
corpus: {seed: 3, n_train: 12, n_heldout: 4}
sources:
  - {name: char, tokenizer: char, hidden: 16, steps: 2}
  - {name: gpt2, arch: gpt2, tokenizer: bytelevel, vocab_size: 300, hidden: 16, steps: 2}
target: {tokenizer: bpe, vocab_size: 50, hidden: 16, steps: 1}
extraction: {shard_size: 4, workers_per_source: 2}
fusion: {k: 3, steps: 2, batch_size: 4}
"""


def test_ray_job_submit_runs_fusion_across_both_nodes(loopback_cluster: Cluster):
    """`evoray fuse --use-ray` as a Ray job: builds, extraction actors and trainings are Ray
    tasks spread over the two nodes, and the fused model lands in the shared output dir."""
    cluster = loopback_cluster
    src, out = cluster.tmp / "src_fuse", cluster.tmp / "fuse_out"
    _copy_repo(src)
    (src / "fuse_tiny.yaml").write_text(FUSE_TINY)
    submission = f"evoray-fuse-{secrets.token_hex(4)}"
    cmd = ["python", "-m", "evoray", "fuse", "fuse_tiny.yaml", "--use-ray", "--address", "auto"]
    job = cluster.ray(
        "job", "submit", f"--address={cluster.address}", f"--submission-id={submission}",
        "--working-dir", str(src), "--", *cmd, "--out", str(out), "--json", str(out / "r.json"),
        timeout=240,
    )  # fmt: skip
    assert job.returncode == 0, f"the job failed:\n{job.stdout[-6000:]}\n{job.stderr[-3000:]}"
    assert "target after FuseLLM" in job.stdout
    result = json.loads((out / "r.json").read_text())
    assert result["devices"] == ["cpu", "cpu"]
    assert (out / "target_fused" / "model.safetensors").is_file()
    assert len(list((out / "distributions" / "source_1").glob("shard-*.parquet"))) == 3
    nodes = {n["node_id"] for n in cluster.state("nodes")}
    tasks = cluster.state("tasks", "--detail", "--filter=func_or_class_name=_run_job")
    workers = cluster.state("actors", "--detail", "--filter=class_name=SourceWorker")
    assert len(tasks) >= 5 and len(workers) == 4  # 3 builds + 2 trainings; 2 actors x 2 sources
    used = {t["node_id"] for t in tasks} | {w["node_id"] for w in workers}
    assert used == nodes, (used, nodes)
