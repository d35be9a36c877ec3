"""Golden references that run on every machine (issue 28), unlike the hash pins of
tests/test_split_bytes.py, which hold only on the recording jax version and CPU kind.

- One step each of DC, DSA, DM and MTT and the evaluation trainer on a tiny fixed input
  (benchmarks/golden.py), against tests/fixtures/golden.json, with per-number tolerances of
  100x the float noise measured between XLA variants (one thread, XLA's convolution, remat).
- The reference PyTorch code's own numbers for DC's matching distance, MTT's loss and DM's loss
  (with its gradient w.r.t. the synthetic images) on fixed arrays (recorded once by
  benchmarks/torch_reference.py; torch is not needed here).
- The MI estimators' values on a small score matrix, as literal numbers.
None of these skip."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import golden  # noqa: E402

from mim4dd_jax import mi, models, objectives  # noqa: E402

with open(golden.FIXTURE) as _f:
    FIXTURE = json.load(_f)
CASES = sorted(FIXTURE["values"])


@pytest.fixture(scope="module")
def computed():
    return golden.compute()


@pytest.mark.parametrize("case", CASES)
def test_one_step_matches_the_golden_numbers(computed, case):
    expected, rtol = FIXTURE["values"][case], FIXTURE["rtol"][case]
    assert sorted(computed[case]) == sorted(expected)
    diffs = golden.relative_differences({case: expected}, {case: computed[case]})[case]
    bad = {q: (d, rtol[q]) for q, d in diffs.items() if not d <= rtol[q]}
    assert not bad, f"{case}: (relative difference, tolerance) {bad}; got {computed[case]}"


def test_the_comparison_can_fail():
    """A changed formula (here: DM's loss doubled) is far outside every tolerance."""
    case = FIXTURE["values"]["dm"]
    doubled = {"dm": {**case, "loss": [2 * case["loss"][0]]}}
    diff = golden.relative_differences({"dm": case}, doubled)["dm"]["loss"]
    assert diff > 100 * FIXTURE["rtol"]["dm"]["loss"]


# ----------------------------------------------------------------------------------------------
# The MI estimators on a 4 x 6 score matrix: synthetic labels 0 0 1 2, real labels 0 1 1 2 2 0.
# ----------------------------------------------------------------------------------------------

SCORES = jnp.array(
    [
        [2.0, -1.0, 0.5, 0.0, -0.5, 1.5],
        [0.3, 0.8, -1.2, 0.1, 0.0, 2.2],
        [-0.7, 1.9, 1.1, -0.3, 0.4, -1.0],
        [0.0, -0.2, 0.6, 1.4, 2.5, -0.8],
    ],
    jnp.float32,
)
# Recorded 2026-12 (jax 0.10.2, XLA:CPU); float32 transcendental noise is ~1e-7 relative.
ESTIMATES = {
    "infonce": 0.6519140005111694,
    "nce": -0.9447662830352783,
    "nwj": 0.6373789310455322,
    "js": -0.03815414011478424,
}


@pytest.mark.parametrize("name", sorted(ESTIMATES))
def test_estimators_give_their_pinned_values(name):
    positive = mi.positive_mask(
        real_labels=jnp.array([0, 1, 1, 2, 2, 0]), syn_labels=jnp.array([0, 0, 1, 2])
    )
    value = float(getattr(mi, name)(SCORES, positive))
    assert value == pytest.approx(ESTIMATES[name], rel=2e-6, abs=1e-7)


def test_nce_with_a_data_count_gives_its_pinned_value():
    positive = mi.positive_mask(
        real_labels=jnp.array([0, 1, 1, 2, 2, 0]), syn_labels=jnp.array([0, 0, 1, 2])
    )
    value = float(mi.nce(SCORES, positive, n_data=100.0))
    assert value == pytest.approx(-17.865638732910156, rel=2e-6)


# ----------------------------------------------------------------------------------------------
# The reference PyTorch formulas' numbers (benchmarks/torch_reference.py, recorded once).
# ----------------------------------------------------------------------------------------------

import torch_reference  # noqa: E402

with open(torch_reference.FIXTURE) as _f:
    TORCH = json.load(_f)


def _ours(leaf: np.ndarray) -> np.ndarray:
    """A torch-layout leaf in our layout: conv [out, in, kh, kw] -> HWIO, linear [out, in] ->
    [in, out]."""
    if leaf.ndim == 4:
        return leaf.transpose(2, 3, 1, 0)
    return leaf.T if leaf.ndim == 2 else leaf


def test_dc_matching_distance_equals_the_reference_code():
    a = torch_reference.arrays()
    real = {k: jnp.asarray(_ours(v)) for k, v in a["real"].items()}
    syn = {k: jnp.asarray(_ours(v)) for k, v in a["syn"].items()}
    value = float(objectives.gradient_distance(real, syn))
    assert value == pytest.approx(TORCH["dc_matching_distance"], rel=1e-5)
    # In torch's layout (rows split on the wrong axis) the number differs: the test can fail.
    wrong = float(objectives.gradient_distance(a["real"], a["syn"]))
    assert abs(wrong - TORCH["dc_matching_distance"]) > 1e-2


def test_mtt_loss_equals_the_reference_code():
    m = torch_reference.arrays()["mtt"]
    value = float(objectives.mtt_loss(m["student"], m["start"], m["target"]))
    assert value == pytest.approx(TORCH["mtt_loss"], rel=1e-5)


def _dm_variables(d: dict[str, np.ndarray], swap_hw: bool = False) -> dict:
    """DM's torch weights (benchmarks/torch_reference.py, ``dm_arrays``) as our ConvNet's
    variables. torch's convN / normN are our conv{N-1} / norm{N-1}; the norm's weight is our
    scale. The classifier (unused by DM's loss) has its input rows permuted too, from torch's
    (C, H, W) flattening to our (H, W, C). swap_hw: transpose each conv kernel's rows and
    columns, a wrong layout for the can-fail check."""
    params = {}
    for i in (1, 2):
        kernel = _ours(d[f"conv{i}.weight"])
        params[f"conv{i - 1}"] = {
            "kernel": jnp.asarray(kernel.transpose(1, 0, 2, 3) if swap_hw else kernel),
            "bias": jnp.asarray(d[f"conv{i}.bias"]),
        }
        params[f"norm{i - 1}"] = {
            "scale": jnp.asarray(d[f"norm{i}.weight"]),
            "bias": jnp.asarray(d[f"norm{i}.bias"]),
        }
    w = d["classifier.weight"]  # [out, C * h * w], (C, h, w) order, h = w
    width = d["conv2.weight"].shape[0]
    side = round((w.shape[1] // width) ** 0.5)
    w = w.reshape(len(w), width, side, side).transpose(0, 2, 3, 1).reshape(len(w), -1)
    params["classifier"] = {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(d["classifier.bias"])}
    return {"params": params}


def test_dm_loss_equals_the_reference_code():
    """Our DM loss (sum over classes of the squared distance between the class's mean real and
    mean synthetic embedding, as main_DM.py) and its gradient w.r.t. the synthetic images, with
    the reference ConvNet's weights, equal the reference code's. The embedding is flattened in
    (H, W, C) order here and (C, H, W) in torch, a permutation that the summed square ignores."""
    d = torch_reference.arrays()["dm"]
    model = models.ConvNet(
        num_classes=torch_reference.DM_CLASSES, width=8, depth=2, norm="instance"
    )
    # torch [class, image, 1, H, W] -> ours [class, image, H, W, 1]
    real = jnp.asarray(d["real"].transpose(0, 1, 3, 4, 2))
    syn = jnp.asarray(d["syn"].transpose(0, 1, 3, 4, 2))
    variables = _dm_variables(d)
    fresh = model.init(jax.random.key(0), syn[0])
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, fresh)

    def loss(syn_x, variables=variables):
        return objectives.dm_loss(variables, real, syn_x, jax.random.key(0), model=model)

    value, grad = jax.value_and_grad(loss)(syn)
    # Measured: within 2.4e-7 relative of the recorded numbers for every conv_impl and
    # real_chunk; the reference itself in float32 is within 1e-7 of its float64 run on the loss
    # and the norm, and 1.4e-7 absolute on any gradient entry (these two are ~0.25 in size).
    assert float(value) == pytest.approx(TORCH["dm_loss"], rel=1e-5)
    assert float(jnp.linalg.norm(grad)) == pytest.approx(TORCH["dm_syn_grad_norm"], rel=1e-5)
    grad_torch = np.asarray(grad).transpose(0, 1, 4, 2, 3)
    entries = [float(grad_torch[i]) for i in torch_reference.DM_GRAD_ENTRIES]
    assert entries == pytest.approx(TORCH["dm_syn_grad_entries"], rel=1e-5)
    # With each conv kernel's rows and columns swapped the number differs: the test can fail.
    wrong = float(loss(syn, _dm_variables(d, swap_hw=True)))
    assert abs(wrong / TORCH["dm_loss"] - 1) > 1e-2
