"""The README's Python examples run as written, and give the shapes their comments promise."""

import os
import re

import jax.numpy as jnp
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
FMNIST = "/usr/share/datasets/fashion-mnist"


def _blocks():
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def _check_library_block(ns):
    """'Using the library in your own code'."""
    ds, out, x, result = ns["ds"], ns["out"], ns["x"], ns["result"]
    assert ds.train_images.shape[1:] == (28, 28, 1) and ds.train_images.dtype == jnp.float32
    assert abs(float(ds.train_images.mean())) < 0.05  # normalised
    assert abs(float(ds.train_images.std()) - 1) < 0.05
    assert out.logits.shape == (8, 10) and out.embedding.shape == (8, 2048)
    assert len(out.blocks) == 3 and out.blocks[-1].shape == (8, 4, 4, 128)
    assert x.shape == (8, 28, 28, 1)
    assert result.model == "convnet" and result.accuracies.shape == (2,)
    assert str(result).startswith("convnet: ") and str(result).endswith("% (2 models)")


def _check_mi_block(ns):
    """'Adding the MI term to your own loss'."""
    real = ns["model"].apply(ns["v"], ns["x_real"], features=True).blocks
    assert isinstance(real, tuple) and all(f.ndim == 4 and f.shape[0] == 40 for f in real)
    assert ns["aux"]["mi"].shape == (len(real),)  # one MI estimate per layer
    assert ns["g_syn"].shape == ns["syn_x"].shape == (10, 28, 28, 1)
    assert ns["loss"].shape == ()


def _check_method_block(ns):
    """'Adding a base method': the toy method ran one guarded step with the MI term."""
    from mim4dd_jax import methods

    try:
        assert ns["s"]["images"].shape == (3 * 2, 8, 8, 1)
        assert ns["metrics"]["mi"].shape == (1,)
        assert int(ns["metrics"]["skipped"]) == 0
        assert float(ns["metrics"]["loss"]) != float(ns["metrics"]["base_loss"])  # MI is in
    finally:
        methods._REGISTRY.pop("mean", None)  # the registry is per process: leave it as it was


# A marker found in exactly one block -> the checks of that block's promises.
CHECKS = {
    "out.logits [8,10]": _check_library_block,
    "mi.mi_loss(": _check_mi_block,
    "methods.register(": _check_method_block,
}


def test_every_shape_check_finds_its_block():
    for marker in CHECKS:
        assert sum(marker in block for block in _blocks()) == 1, marker


@pytest.mark.skipif(
    not os.path.isdir(FMNIST) and not os.environ.get("CI"), reason="needs dataset-fashion-mnist"
)
@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs(index):
    block, ns = _blocks()[index], {}
    exec(compile(block, f"README.md block {index}", "exec"), ns)
    for marker, check in CHECKS.items():
        if marker in block:
            check(ns)
