"""GPU paths: skipped without CUDA (CI has none); run them on a GPU machine with
`pytest -m gpu` or `pytest tests/test_gpu_paths.py`."""

from __future__ import annotations

import pytest
import torch

from evoray.kinship.metrics import kinship_flat

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_kinship_of_a_gpu_offspring_against_cpu_parents():
    """A GPU worker scores kinship of its on-device offspring against CPU population vectors."""
    g = torch.Generator().manual_seed(0)
    base, parent, child = (torch.randn(10_000, generator=g) for _ in range(3))
    on_cpu = kinship_flat(child, parent, base, chunk=4096).as_dict()
    mixed = kinship_flat(child.cuda(), parent, base, chunk=4096).as_dict()
    assert mixed == pytest.approx(on_cpu, rel=1e-5)
