"""Coreset baselines: herding and random selection."""

import jax
import jax.numpy as jnp
import numpy as np

from mim4dd_jax import coreset, data


def test_herding_picks_the_known_greedy_sequence():
    # 1-D features with class mean 0: greedy herding takes 0, then the first of +1/-1 (a tie
    # broken by index), then the other, keeping the running mean closest to 0.
    feats = jnp.asarray([[0.0], [10.0], [-10.0], [1.0], [-1.0]])
    np.testing.assert_array_equal(np.asarray(coreset.herding_select(feats, 5, 3)), [0, 3, 4])


def test_herding_ignores_padding_rows_and_is_nested():
    feats = jax.random.normal(jax.random.key(0), (12, 4))
    padded = jnp.concatenate([feats, jnp.full((4, 4), 1e-3)])  # padding near the mean
    five = np.asarray(coreset.herding_select(padded, 12, 5))
    assert (five < 12).all() and len(set(five.tolist())) == 5
    three = np.asarray(coreset.herding_select(padded, 12, 3))
    np.testing.assert_array_equal(three, five[:3])


def test_herding_mean_beats_random_mean():
    feats = np.asarray(jax.random.normal(jax.random.key(1), (400, 8)))
    labels = np.arange(400) % 2
    index = data.class_index(labels, 2)
    herd = coreset.herding_indices(feats, index, 10)
    rand = np.asarray(coreset.random_indices(jax.random.key(2), index, 10))
    for c in range(2):
        mu = feats[labels == c].mean(0)
        assert (labels[herd[c]] == c).all()
        err_h = np.linalg.norm(feats[herd[c]].mean(0) - mu)
        err_r = np.linalg.norm(feats[rand[c]].mean(0) - mu)
        assert err_h < 0.5 * err_r
