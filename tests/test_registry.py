"""Merge-method registry: defaults, validation, model counts, seeds."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

from evoray.errors import ConfigError, LayoutError
from evoray.merge import (
    METHODS,
    REQUIRED,
    MergeMethod,
    ParamDef,
    dare_ties,
    derive_seed,
    get_method,
    linear,
    model_stock,
    slerp,
    task_arithmetic,
    ties,
)


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = rand(6, 5, seed=0)
MODELS = [rand(6, 5, seed=i) for i in (1, 2, 3)]

# mergekit's defaults (merge_methods/registry.py, generalized_task_arithmetic.py, linear.py,
# slerp.py, model_stock.py)
EXPECTED_DEFAULTS = {
    "linear": {"weight": REQUIRED, "normalize": True},
    "task_arithmetic": {
        "weight": REQUIRED,
        "density": 1.0,
        "int8_mask": False,
        "normalize": False,
        "rescale": False,
        "lambda": 1.0,
    },
    "ties": {
        "weight": REQUIRED,
        "density": 1.0,
        "int8_mask": False,
        "normalize": True,
        "rescale": False,
        "lambda": 1.0,
    },
    "dare_linear": {
        "weight": REQUIRED,
        "density": 1.0,
        "int8_mask": False,
        "normalize": False,
        "rescale": True,
        "lambda": 1.0,
    },
    "dare_ties": {
        "weight": REQUIRED,
        "density": 1.0,
        "int8_mask": False,
        "normalize": False,
        "rescale": True,
        "lambda": 1.0,
    },
    "breadcrumbs": {
        "weight": REQUIRED,
        "density": 1.0,
        "gamma": 0.01,
        "int8_mask": False,
        "normalize": False,
        "rescale": False,
        "lambda": 1.0,
    },
    "breadcrumbs_ties": {
        "weight": REQUIRED,
        "density": 1.0,
        "gamma": 0.01,
        "int8_mask": False,
        "normalize": False,
        "rescale": False,
        "lambda": 1.0,
    },
    "slerp": {"t": REQUIRED},
    "model_stock": {"filter_wise": False},
}
PER_MODEL = {"weight", "density", "gamma"}


def test_methods_and_defaults_match_mergekit():
    assert set(METHODS) == set(EXPECTED_DEFAULTS)
    for name, expected in EXPECTED_DEFAULTS.items():
        m = get_method(name)
        assert isinstance(m, MergeMethod) and m.name == name
        assert {p.name: p.default for p in m.params} == expected, name
        for p in m.params:
            assert isinstance(p, ParamDef)
            assert p.per_model == (p.name in PER_MODEL), (name, p.name)
            assert p.doc
        assert m.doc
    assert not METHODS["linear"].needs_base
    assert all(METHODS[n].needs_base for n in EXPECTED_DEFAULTS if n != "linear")
    assert (METHODS["slerp"].min_models, METHODS["slerp"].max_models) == (1, 1)
    assert METHODS["model_stock"].min_models == 2
    assert [n for n, m in METHODS.items() if m.uses_seed] == ["dare_linear", "dare_ties"]


def test_get_method_unknown_lists_known():
    with pytest.raises(ConfigError) as e:
        get_method("tie")
    msg = str(e.value)
    assert "'tie'" in msg
    for name in METHODS:
        assert name in msg


def test_required_is_a_picklable_singleton():
    assert pickle.loads(pickle.dumps(REQUIRED)) is REQUIRED
    assert repr(REQUIRED) == "REQUIRED"


@pytest.mark.parametrize("name", sorted(EXPECTED_DEFAULTS))
def test_methods_pickle(name):
    m = pickle.loads(pickle.dumps(METHODS[name]))
    assert m == METHODS[name]
    n = 1 if name == "slerp" else 2
    mp = [{} if name in ("slerp", "model_stock") else {"weight": 1.0}] * n
    params = {"t": 0.5} if name == "slerp" else {}
    base = None if name == "linear" else BASE
    out = m.merge(MODELS[:n], base, mp, params, seed=1, tensor_name="w")
    assert torch.equal(
        out, METHODS[name].merge(MODELS[:n], base, mp, params, seed=1, tensor_name="w")
    )


def test_defaults_applied():
    w = [{"weight": 0.5}, {"weight": 1.0}, {"weight": 2.0}]
    m = METHODS["ties"]
    out = m.merge(MODELS, BASE, w, {"density": 0.5}, tensor_name="x")
    # ties defaults: normalize True, lambda 1, rescale False; global density is the default
    expected = ties(BASE, MODELS, [0.5, 1.0, 2.0], [0.5] * 3, normalize=True)
    assert torch.equal(out, expected)
    per, glob = m.resolve_params(w, {"density": 0.5})
    assert per[0] == {"weight": 0.5, "density": 0.5}
    assert glob == {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0}
    # per-model values override the global default
    per, _ = m.resolve_params([{"weight": 1.0, "density": 0.2}], {"density": 0.5, "weight": 3.0})
    assert per == [{"weight": 1.0, "density": 0.2}]
    # global weight as default for every model
    out = METHODS["task_arithmetic"].merge(MODELS, BASE, [{}, {}, {}], {"weight": 0.3})
    assert torch.equal(out, task_arithmetic(BASE, MODELS, [0.3] * 3))
    out = METHODS["linear"].merge(MODELS, None, [{"weight": 1}, {"weight": 3}, {"weight": 0}], {})
    assert torch.equal(out, linear(MODELS, [1, 3, 0]))
    assert torch.equal(
        METHODS["model_stock"].merge(MODELS, BASE, [{}, {}, {}], {}), model_stock(BASE, MODELS)
    )


def test_merge_dispatch_matches_operators():
    w = [{"weight": 0.5, "density": 0.7}, {"weight": 1.0, "density": 0.4}]
    two = MODELS[:2]
    out = METHODS["slerp"].merge([MODELS[0]], BASE, [{}], {"t": 0.3})
    assert torch.equal(out, slerp(0.3, BASE, MODELS[0]))
    seeds = [derive_seed(7, "layer.w", i) for i in range(2)]
    out = METHODS["dare_ties"].merge(two, BASE, w, {"lambda": 1.5}, seed=7, tensor_name="layer.w")
    assert torch.equal(out, dare_ties(BASE, two, [0.5, 1.0], [0.7, 0.4], seeds, lambda_=1.5))
    # int8_mask is accepted and has no effect
    a = METHODS["ties"].merge(two, BASE, w, {"int8_mask": True})
    assert torch.equal(a, METHODS["ties"].merge(two, BASE, w, {}))


def test_endpoints_through_registry():
    s = METHODS["slerp"]
    assert torch.equal(s.merge([MODELS[0]], BASE, [{}], {"t": 0.0}), BASE)
    assert torch.equal(s.merge([MODELS[0]], BASE, [{}], {"t": 1}), MODELS[0])


def test_missing_required():
    with pytest.raises(ConfigError, match=r"ties: missing required parameter 'weight'.*model #1"):
        METHODS["ties"].merge(MODELS[:2], BASE, [{"weight": 1.0}, {}], {}, tensor_name="a.b")
    with pytest.raises(ConfigError, match=r"slerp: missing required parameter 't'.*'a\.b'"):
        METHODS["slerp"].merge([MODELS[0]], BASE, [{}], {}, tensor_name="a.b")


def test_unknown_params():
    with pytest.raises(ConfigError, match=r"linear: unknown parameter 'density'.*allowed"):
        METHODS["linear"].merge(MODELS, None, [{"weight": 1}] * 3, {"density": 0.5})
    with pytest.raises(ConfigError, match=r"ties: unknown parameter 'wieght'.*model #0"):
        METHODS["ties"].merge(MODELS, BASE, [{"wieght": 1}, {}, {}], {"weight": 1})
    with pytest.raises(ConfigError, match="'gamma'"):  # gamma is breadcrumbs-only
        METHODS["ties"].merge(MODELS, BASE, [{}] * 3, {"weight": 1, "gamma": 0.1})
    with pytest.raises(ConfigError, match="'normalize' is global"):
        METHODS["ties"].merge(MODELS, BASE, [{"weight": 1, "normalize": False}] * 3, {})


@pytest.mark.parametrize(
    "method,model_params,params,param",
    [
        ("ties", {"weight": 1, "density": 0.0}, {}, "density"),
        ("ties", {"weight": 1, "density": 1.5}, {}, "density"),
        ("ties", {"weight": 1, "density": 0.5}, {"density": 1.5}, "density"),  # overridden default
        ("dare_ties", {"weight": 1, "density": -0.1}, {}, "density"),
        ("breadcrumbs", {"weight": 1, "gamma": 1.2}, {}, "gamma"),
        ("task_arithmetic", {"weight": float("inf")}, {}, "weight"),
        ("task_arithmetic", {"weight": "1"}, {}, "weight"),
        ("task_arithmetic", {"weight": True}, {}, "weight"),
        ("task_arithmetic", {"weight": 1}, {"lambda": float("nan")}, "lambda"),
        ("ties", {"weight": 1}, {"normalize": "yes"}, "normalize"),
        ("slerp", {}, {"t": 1.01}, "t"),
        ("slerp", {}, {"t": -0.5}, "t"),
        ("model_stock", {}, {"filter_wise": 1}, "filter_wise"),
    ],
)
def test_out_of_range(method, model_params, params, param):
    m = METHODS[method]
    n = 1 if method == "slerp" else 2
    with pytest.raises(ConfigError) as e:
        m.merge(
            MODELS[:n],
            BASE,
            [dict(model_params) for _ in range(n)],
            params,
            tensor_name="model.embed",
        )
    msg = str(e.value)
    assert msg.startswith(f"{method}:")
    assert f"'{param}'" in msg
    assert "model.embed" in msg
    assert "must be" in msg


def test_linear_zero_weight_sum_names_tensor():
    with pytest.raises(ConfigError, match=r"linear.*sum to 0.*'t\.w'"):
        METHODS["linear"].merge(
            MODELS[:2], None, [{"weight": 1}, {"weight": -1}], {}, tensor_name="t.w"
        )


def test_model_counts():
    with pytest.raises(ConfigError, match=r"slerp: needs exactly 1 model\(s\) besides the base.*2"):
        METHODS["slerp"].merge(MODELS[:2], BASE, [{}, {}], {"t": 0.5})
    with pytest.raises(ConfigError, match="model_stock: needs at least 2"):
        METHODS["model_stock"].merge(MODELS[:1], BASE, [{}], {})
    with pytest.raises(ConfigError, match="ties: needs a base_model"):
        METHODS["ties"].merge(MODELS, None, [{"weight": 1}] * 3, {})
    with pytest.raises(ConfigError, match="linear: needs at least 1"):
        METHODS["linear"].merge([], None, [], {})
    with pytest.raises(ValueError, match="parameter sets"):
        METHODS["linear"].merge(MODELS, None, [{"weight": 1}], {})
    with pytest.raises(LayoutError, match="shape"):
        METHODS["task_arithmetic"].merge([rand(3)], BASE, [{"weight": 1}], {})


def test_linear_ignores_base():
    out = METHODS["linear"].merge(MODELS, BASE, [{"weight": 1}] * 3, {})
    assert torch.equal(out, linear(MODELS, [1, 1, 1]))


def test_seed_derivation_stable_and_order_independent():
    w = [{"weight": 1.0, "density": 0.5}] * 2
    m = METHODS["dare_linear"]
    a = m.merge(MODELS[:2], BASE, w, {}, seed=3, tensor_name="x.weight")
    m.merge(MODELS[:2], BASE, w, {}, seed=3, tensor_name="y.weight")  # other tensor in between
    assert torch.equal(a, m.merge(MODELS[:2], BASE, w, {}, seed=3, tensor_name="x.weight"))
    assert not torch.equal(a, m.merge(MODELS[:2], BASE, w, {}, seed=4, tensor_name="x.weight"))
    assert not torch.equal(a, m.merge(MODELS[:2], BASE, w, {}, seed=3, tensor_name="y.weight"))
    seeds = {derive_seed(s, n, i) for s in (0, 1) for n in ("a", "b") for i in (0, 1)}
    assert len(seeds) == 8 and all(0 <= x < 2**63 for x in seeds)
    # same value in a fresh interpreter (no hash randomisation involved)
    code = "from evoray.merge import derive_seed; print(derive_seed(3, 'x.weight', 1))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout) == derive_seed(3, "x.weight", 1)
