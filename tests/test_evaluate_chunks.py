"""Evaluation in chunks of epochs (for progress reports) reproduces the one-program result."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from mim4dd_jax import evaluate, inner, models


def _data(n, key, classes=3):
    k1, k2 = jax.random.split(jax.random.key(key))
    return jax.random.normal(k1, (n, 8, 8, 1)), jax.random.randint(k2, (n,), 0, classes)


MODEL = models.get_model("convnet", num_classes=3, width=4, depth=1)
# 7 passes: the lr decays after pass 3 and the momentum restarts at pass 4.
CONFIG = inner.TrainConfig(epochs=6, batch_size=4)


# Chunks of 3: [0, 3) [3, 6) [6, 7), the reset inside a chunk; of 2: [0, 2) ... [4, 6) [6, 7),
# the reset at a chunk's start.
@pytest.mark.parametrize("parallel,chunk,dsa", [("map", 3, True), ("vmap", 2, False)])
def test_chunked_training_equals_one_program_bit_for_bit(parallel, chunk, dsa):
    (x, y), (xt, yt) = _data(9, 0), _data(30, 1)
    keys = jax.random.split(jax.random.key(2), 2)
    augment = evaluate.dsa_augment_fn("crop_flip", "fake") if dsa else None
    kwargs = dict(model=MODEL, config=CONFIG, augment=augment, parallel=parallel)
    seen = []
    accs, variables = inner.train_and_test_chunked(
        keys,
        x,
        y,
        0.05,
        xt,
        yt,
        chunk_epochs=chunk,
        on_chunk=lambda done, total, loss: seen.append((done, total, np.asarray(loss))),
        return_variables=True,
        **kwargs,
    )
    whole = inner.train_and_test_many(keys, x, y, 0.05, xt, yt, **kwargs)
    np.testing.assert_array_equal(np.asarray(accs), np.asarray(whole))
    train = functools.partial(inner.train_classifier, model=MODEL, config=CONFIG, augment=augment)
    one = lambda k: train(k, x, y, 0.05)  # noqa: E731
    many = jax.vmap(one) if parallel == "vmap" else functools.partial(jax.lax.map, one)
    expected = jax.jit(many)(keys)
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
    passes = CONFIG.epochs + 1
    assert [d for d, _, _ in seen] == sorted(
        {min(passes, s + chunk) for s in range(0, passes, chunk)}
    )
    assert all(t == passes and loss.shape == (2,) and np.all(loss > 0) for _, t, loss in seen)


class Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False, features=False):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_progress_bar_shows_loss_and_accuracy_and_changes_nothing(capsys):
    (x, y), (xt, yt) = _data(9, 0), _data(30, 1)
    run = functools.partial(
        evaluate.evaluate,
        jax.random.key(0),
        x,
        y,
        xt,
        yt,
        architectures=[("linear", Linear())],
        num_models=2,
        train_config=inner.TrainConfig(epochs=4, batch_size=4),
    )
    quiet = run()  # pytest's stderr is no terminal: no bar, one program
    assert capsys.readouterr().err == ""
    shown = run(progress=True, chunk_epochs=2)
    err = capsys.readouterr().err
    np.testing.assert_array_equal(shown[0].accuracies, quiet[0].accuracies)
    assert "eval linear x2" in err and "5/5" in err and "loss " in err
    assert f"acc {100 * quiet[0].mean:.2f} ± {100 * quiet[0].std:.2f} %" in err
