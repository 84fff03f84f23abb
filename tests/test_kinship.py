"""Kinship matrix over checkpoints: exact values, one streaming pass, Ray, per layer, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evoray.errors import EvorayError, LayoutError
from evoray.kinship.cli import add_kinship_parser
from evoray.kinship.gram import GramSums, layer_group
from evoray.kinship.matrix import KinshipResult, kinship_matrix
from evoray.kinship.metrics import kinship_flat
from evoray.kinship.plot import heatmap
from evoray.weights import checkpoint as checkpoint_mod
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.layers import layer_index
from tests.factories import make_tiny_model

METRICS = ("pearson", "cosine", "euclidean")


@pytest.fixture(scope="module")
def bf16_finetune(tiny_models_dir: Path, tiny_base: Path) -> Path:
    """A bf16 checkpoint of a fine-tune of the (float32) base."""
    return make_tiny_model(
        tiny_models_dir / "kin_bf16", base=tiny_base, seed=7, noise=0.02, dtype=torch.bfloat16
    )


@pytest.fixture(scope="module")
def models(tiny_finetunes: list[Path], bf16_finetune: Path) -> list[Path]:
    return [*tiny_finetunes, bf16_finetune]


def flat_deltas(base: Path, models: list[Path], keep=lambda name: True) -> np.ndarray:
    """Rows: each model's flattened float64 delta over the floating tensors ``keep`` selects."""
    with open_checkpoint(base) as b:
        names = [n for n in b.names() if b.info(n).dtype.is_floating_point and keep(n)]
        ref = {n: b.get(n).double().numpy().ravel() for n in names}
    rows = []
    for m in models:
        with open_checkpoint(m) as c:
            rows.append(np.concatenate([c.get(n).double().numpy().ravel() - ref[n] for n in names]))
    return np.stack(rows)


def reference(d: np.ndarray) -> dict[str, np.ndarray]:
    norms = np.linalg.norm(d, axis=1)
    return {
        "pearson": np.corrcoef(d),
        "cosine": d @ d.T / np.outer(norms, norms),
        "euclidean": np.linalg.norm(d[:, None, :] - d[None, :, :], axis=2),
    }


def assert_same(a: KinshipResult, b: KinshipResult, rtol: float = 1e-6) -> None:
    for m in METRICS:
        np.testing.assert_allclose(a.matrix(m), b.matrix(m), rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(a.delta_norms, b.delta_norms, rtol=rtol)
    assert a.n_elements == b.n_elements


# --- values -----------------------------------------------------------------------------------


def test_matrix_matches_numpy_over_flat_deltas(tiny_base, models):
    res = kinship_matrix(tiny_base, models, parallel=False)
    d = flat_deltas(tiny_base, models)
    assert res.n_elements == d.shape[1]
    for m, expected in reference(d).items():
        np.testing.assert_allclose(res.matrix(m), expected, rtol=1e-6, atol=1e-8, err_msg=m)
    np.testing.assert_allclose(res.delta_norms, np.linalg.norm(d, axis=1), rtol=1e-6)
    # The two-model path (evoray.kinship.metrics) agrees pair by pair.
    x, y = torch.from_numpy(d[0]), torch.from_numpy(d[3])
    pair = kinship_flat(x, y, torch.zeros_like(x))
    for m in METRICS:
        assert res.matrix(m)[0, 3] == pytest.approx(getattr(pair, m), rel=1e-5)
        assert getattr(res.total.pair(0, 3), m) == pytest.approx(getattr(pair, m), rel=1e-5)


def test_symmetric_with_exact_diagonals(tiny_base, models):
    res = kinship_matrix(tiny_base, models, parallel=False)
    for m in METRICS:
        a = res.matrix(m)
        assert a.shape == (4, 4)
        np.testing.assert_array_equal(a, a.T)
        np.testing.assert_array_equal(np.diag(a), 0.0 if m == "euclidean" else 1.0)
    assert res.labels == tuple(p.name for p in models)


def test_chunk_size_does_not_change_values(tiny_base, models):
    ref = kinship_matrix(tiny_base, models, parallel=False)
    for chunk in (7, 1000, 1 << 22):
        assert_same(kinship_matrix(tiny_base, models, parallel=False, chunk_elems=chunk), ref)


def test_model_equal_to_base_gives_nan_correlations(tiny_base, tiny_finetunes):
    res = kinship_matrix(tiny_base, [tiny_base, *tiny_finetunes[:1]], parallel=False)
    assert res.delta_norms[0] == 0
    assert np.isnan(res.matrix("pearson")[0]).all()
    assert np.isnan(res.matrix("cosine")[0, 1])
    assert res.matrix("euclidean")[0, 1] == pytest.approx(res.delta_norms[1])
    data = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert data["metrics"]["pearson"][0][1] is None


def test_gram_sums_merge_is_addition():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(3, 50))

    def sums(x: np.ndarray) -> GramSums:
        return GramSums(x.shape[1], x.sum(axis=1), x @ x.T)

    whole, parts = sums(d), sums(d[:, :20]).merge(sums(d[:, 20:]))
    for m in METRICS:
        np.testing.assert_allclose(parts.matrix(m), whole.matrix(m), rtol=1e-12)
    np.testing.assert_allclose(whole.matrix("pearson"), np.corrcoef(d), rtol=1e-12)


# --- layouts and formats ------------------------------------------------------------------------


def test_sharded_checkpoints_give_the_same_matrix(tmp_path, tiny_base, tiny_finetunes, ray_local):
    # Rebuilt with the fine-tune's arguments (deterministic), saved in many small shards.
    sharded = make_tiny_model(
        tmp_path / "finetune1_sharded",
        base=tiny_base,
        seed=1,
        steps=2,
        noise=0.01,
        max_shard_size="20KB",
    )
    assert len(open_checkpoint(sharded).files) > 1
    ref = kinship_matrix(tiny_base, tiny_finetunes, parallel=False)
    models = [sharded, *tiny_finetunes[1:]]
    assert_same(kinship_matrix(tiny_base, models, parallel=False), ref)
    assert_same(kinship_matrix(tiny_base, models, parallel=True), ref)


def test_single_safetensors_files_work(tiny_base, tiny_finetunes):
    files = [p / "model.safetensors" for p in tiny_finetunes]
    res = kinship_matrix(tiny_base / "model.safetensors", files, parallel=False)
    assert_same(res, kinship_matrix(tiny_base, tiny_finetunes, parallel=False))
    assert res.labels == tuple(str(f) for f in files)  # stems collide: full paths


def test_layout_mismatch_names_tensor_before_reading(
    tmp_path, tiny_base, tiny_finetunes, monkeypatch
):
    other = make_tiny_model(tmp_path / "wide", seed=0, intermediate_size=48)

    def no_reads(self, name):
        raise AssertionError(f"read {name} before the layout check")

    monkeypatch.setattr(checkpoint_mod.Checkpoint, "get", no_reads)
    with pytest.raises(LayoutError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight"):
        kinship_matrix(tiny_base, [*tiny_finetunes[:2], other], parallel=False)
    with pytest.raises(LayoutError, match=r"model\.layers\.0\.mlp"):
        kinship_matrix(tiny_base, [*tiny_finetunes[:2], other], parallel=True)


def test_bad_arguments(tiny_base, tiny_finetunes):
    with pytest.raises(EvorayError, match="at least two models"):
        kinship_matrix(tiny_base, tiny_finetunes[:1])
    with pytest.raises(ValueError, match="unknown kinship metric"):
        kinship_matrix(tiny_base, tiny_finetunes, metrics=["jaccard"])


# --- parallel and per layer ---------------------------------------------------------------------


def test_parallel_equals_sequential(tiny_base, models, ray_local):
    seq = kinship_matrix(tiny_base, models, parallel=False, per_layer=True)
    par = kinship_matrix(tiny_base, models, parallel=True, per_layer=True, chunk_elems=100)
    assert_same(par, seq)
    assert list(par.layers) == list(seq.layers)
    for key in seq.layers:
        for m in METRICS:
            np.testing.assert_allclose(
                par.layer_matrix(key, m), seq.layer_matrix(key, m), rtol=1e-6, atol=1e-7
            )
    # parallel=None follows Ray: initialised here, so it uses tasks and gives the same values.
    assert_same(kinship_matrix(tiny_base, models), seq)


def test_per_layer_values(tiny_base, models):
    res = kinship_matrix(tiny_base, models, parallel=False, per_layer=True)
    assert list(res.layers) == ["embeddings", "layers.0", "layers.1", "head"]
    assert sum(s.n for s in res.layers.values()) == res.n_elements
    d = flat_deltas(tiny_base, models, keep=lambda n: layer_index(n) == 1)
    for m, expected in reference(d).items():
        np.testing.assert_allclose(res.layer_matrix("layers.1", m), expected, rtol=1e-5, atol=1e-7)
    d = flat_deltas(tiny_base, models, keep=lambda n: layer_group(n) == "head")
    np.testing.assert_allclose(res.per_layer["head"]["pearson"], np.corrcoef(d), rtol=1e-5)
    assert layer_group("model.embed_tokens.weight") == "embeddings"
    assert layer_group("lm_head.weight") == layer_group("model.norm.weight") == "head"
    table = res.format_layer_table("pearson")
    assert "layers.1" in table and "1-4" in table
    data = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert set(data["per_layer"]) == set(res.layers)
    assert data["per_layer"]["layers.0"]["n_elements"] == res.layers["layers.0"].n


def test_sequential_holds_one_tensor_per_checkpoint(tiny_base, models, tensor_reads):
    """Memory: at most one live tensor per checkpoint (base + N), each tensor read once."""
    kinship_matrix(tiny_base, models, parallel=False, per_layer=True, chunk_elems=256)
    with open_checkpoint(tiny_base) as b:
        n_float = sum(b.info(n).dtype.is_floating_point for n in b.names())
    assert tensor_reads.reads == (len(models) + 1) * n_float
    assert tensor_reads.peak <= len(models) + 1


# --- output -------------------------------------------------------------------------------------


def test_table_json_and_heatmap(tmp_path, tiny_base, models):
    res = kinship_matrix(tiny_base, models, parallel=False, metrics=["pearson", "euclidean"])
    table = res.format_table("pearson")
    assert all(lab in table for lab in res.labels) and "1.0000" in table
    data = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert set(data["metrics"]) == {"pearson", "euclidean"}
    np.testing.assert_allclose(data["metrics"]["pearson"], res.matrix("pearson"))
    png = heatmap(res, "cosine", tmp_path / "sub" / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="evoray")
    add_kinship_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kinship", *argv])
    return args.func(args)


def test_cli_end_to_end(tmp_path, tiny_base, models, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "k.json"
    argv = [str(tiny_base), *map(str, models), "--per-layer", "--json", str(out), "--no-parallel"]
    assert run_cli(argv) == 0
    text = capsys.readouterr().out
    png = tmp_path / "kinship.png"  # default: current folder
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in text and "euclidean kinship" in text and "layers.1" in text
    data = json.loads(out.read_text())
    expected = kinship_matrix(tiny_base, models, parallel=False).matrix("cosine")
    np.testing.assert_allclose(data["metrics"]["cosine"], expected)

    argv = [str(tiny_base), *map(str, models[:2]), "--metric", "pearson", "--png", "p.png"]
    assert run_cli(argv) == 0
    text = capsys.readouterr().out
    assert "pearson kinship" in text and "cosine" not in text
    assert (tmp_path / "p.png").is_file()


def test_cli_errors_are_evoray_errors(tmp_path, tiny_base, tiny_finetunes):
    with pytest.raises(EvorayError, match="at least two models"):
        run_cli([str(tiny_base), str(tiny_finetunes[0]), "--no-parallel"])
    with pytest.raises(EvorayError, match="not found"):
        run_cli([str(tiny_base), str(tiny_finetunes[0]), str(tmp_path / "missing")])
