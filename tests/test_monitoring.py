"""Run metrics reach the Ray node's metrics endpoint (what the dashboard and Prometheus read)."""

from __future__ import annotations

import time
import urllib.request
import uuid


def test_run_metrics_are_scrapeable(ray_local):
    import ray

    run = uuid.uuid4().hex[:8]

    @ray.remote(num_cpus=0)
    class Trial:
        def report(self, run: str) -> None:
            from evoray.execution.monitoring import RunMetrics

            live = RunMetrics(run, "evolver")
            live.update({"best_fitness": 0.75, "generation": 3, "evaluated": 4, "accepted": 2})
            live.update({"best_fitness": 0.8, "generation": 4, "evaluated": 4, "accepted": 1})

    trial = Trial.remote()
    ray.get(trial.report.remote(run))
    port = ray._private.worker.global_worker.node.metrics_export_port
    wanted = {
        "ray_evoray_best_fitness": 0.8,
        "ray_evoray_generation": 4.0,
        "ray_evoray_offspring_evaluated_total": 8.0,
        "ray_evoray_offspring_accepted_total": 3.0,
    }
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 60  # the node agent exports every few seconds
    while time.monotonic() < deadline and seen != wanted:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        for line in body.decode().splitlines():
            name = line.split("{", 1)[0]
            if name in wanted and f'run="{run}"' in line:
                seen[name] = float(line.rsplit(" ", 1)[1])
        time.sleep(1)
    ray.kill(trial)
    assert seen == wanted
