"""Shared fixtures: tiny offline models built once per test session.

The hub is switched off for the whole run: tests must never depend on the network, and a
stray download attempt should fail fast instead of hanging on a timeout.
"""

from __future__ import annotations

import os
import weakref

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path

import pytest
import torch

from tests.factories import make_tiny_model

# Tiny models on a shared 2-core machine: one thread is several times faster than two
# (thread hand-off dominates such small matrix products).
torch.set_num_threads(1)

N_FINETUNES = 3


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session folder holding the shared tiny models (treat everything in it as read-only)."""
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_base(tiny_models_dir: Path) -> Path:
    """A tiny llama (hidden 32, 2 layers, vocab 64) saved with tokenizer; seed 0."""
    return make_tiny_model(tiny_models_dir / "base", arch="llama", seed=0)


@pytest.fixture(scope="session")
def tiny_finetunes(tiny_models_dir: Path, tiny_base: Path) -> list[Path]:
    """Three "fine-tunes" of ``tiny_base``: two SGD steps plus small seeded noise (seeds 1-3)."""
    return [
        make_tiny_model(
            tiny_models_dir / f"finetune{i}", base=tiny_base, seed=i, steps=2, noise=0.01
        )
        for i in range(1, N_FINETUNES + 1)
    ]


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_models_dir: Path) -> Path:
    """A tiny GPT-2 (tied input/output embeddings): a second architecture for layout tests."""
    return make_tiny_model(tiny_models_dir / "gpt2", arch="gpt2", seed=0)


@pytest.fixture(scope="session")
def tiny_bert(tiny_models_dir: Path) -> Path:
    """A tiny BERT masked LM: an encoder-only architecture."""
    return make_tiny_model(tiny_models_dir / "bert", arch="bert", seed=0)


SMALL_ZOO = {
    "hidden_size": 32,
    "pretrain_steps": 30,
    "finetune_epochs": 3,
    "general_epochs": 1,
    "n_domains": 3,
}


@pytest.fixture(scope="session")
def small_zoo(tmp_path_factory: pytest.TempPathFactory):
    """A fast zoo (hidden 32, 3 experts): for plumbing, not for accuracy claims."""
    from evoray.models.zoo import ZooSpec, build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo"), ZooSpec(**SMALL_ZOO), report=lambda _: None)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class TensorReads:
    """Counts ``Checkpoint.get`` calls and the most tensors they returned alive at once."""

    def __init__(self) -> None:
        self.reads = 0
        self.peak = 0
        self._live: set[int] = set()

    def seen(self, t: torch.Tensor) -> None:
        key = id(t)
        self._live.add(key)
        weakref.finalize(t, self._live.discard, key)
        self.reads += 1
        self.peak = max(self.peak, len(self._live))


@pytest.fixture
def tensor_reads(monkeypatch: pytest.MonkeyPatch) -> TensorReads:
    """Peak-memory probe for streaming code: one live tensor per input is the bound to test."""
    from evoray.weights import checkpoint as checkpoint_mod

    counter = TensorReads()
    original = checkpoint_mod.Checkpoint.get

    def counting_get(self, name):
        t = original(self, name)
        counter.seen(t)
        return t

    monkeypatch.setattr(checkpoint_mod.Checkpoint, "get", counting_get)
    return counter


# -- markers: `make test-fast` skips what starts Ray, Tune or a cluster ---------------------------
# ray: uses a Ray runtime (the session's local Ray, or its own); cluster: starts a multi-node
# cluster or `ray job submit`; slow: either of those, or drives whole `evoray` runs in
# subprocesses. CI runs everything.
_CLUSTER_MODULES = {"test_cluster_submit"}
_SLOW_MODULES = {"test_run_search", "test_resume", "test_monitoring", *_CLUSTER_MODULES}
_RAY_FIXTURES = {"ray_local", "pools"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        uses_ray = bool(_RAY_FIXTURES & set(getattr(item, "fixturenames", ())))
        if module in _CLUSTER_MODULES:
            item.add_marker(pytest.mark.cluster)
        if uses_ray or module in _SLOW_MODULES:
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)
