"""Tests for mim4dd_jax.mi: bounds, numerics, heads, streaming, memory bank, pair selection."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mim4dd_jax import mi
from mim4dd_jax.errors import ConfigError
from mim4dd_jax.mi import critics

ESTIMATORS = mi.ESTIMATORS


def _with(heads, **cfg):
    """The same head params under other options (e.g. one estimator after another)."""
    return mi.Heads(heads.params, mi.make_config(**cfg))


def _keys(seed, n):
    return jax.random.split(jax.random.PRNGKey(seed), n)


def _random_problem(seed, ns=12, nr=30, dim=8, classes=3):
    k = _keys(seed, 4)
    return (
        jax.random.normal(k[0], (ns, dim)),
        jax.random.normal(k[1], (nr, dim)),
        jax.random.randint(k[2], (ns,), 0, classes),
        jax.random.randint(k[3], (nr,), 0, classes),
    )


def _feats(seed, ns=6, nr=20, classes=3, shapes=((4, 4, 3), (2, 2, 5))):
    k = _keys(seed, 2 * len(shapes) + 2)
    real = tuple(jax.random.normal(k[2 * i], (nr,) + s) for i, s in enumerate(shapes))
    syn = tuple(jax.random.normal(k[2 * i + 1], (ns,) + s) for i, s in enumerate(shapes))
    yr = jax.random.randint(k[-1], (nr,), 0, classes)
    ys = jnp.arange(ns) % classes
    return real, syn, yr, ys


# ---- correlated Gaussians: x, y in R^d, per-dimension correlation rho ----------------------------


def _gaussian_pairs(key, n, d, rho):
    """n pairs; rho: a scalar or one correlation per dimension [d]."""
    kx, ke = jax.random.split(key)
    x = jax.random.normal(kx, (n, d))
    return x, rho * x + jnp.sqrt(1.0 - rho**2) * jax.random.normal(ke, (n, d))


def _log_ratio(x, y, rho):
    """log p(x, y) / (p(x) p(y)) for every pair: [Nx, Ny]. rho: [d]."""
    x, y = x[:, None, :], y[None, :, :]
    quad = (rho**2 * x**2 - 2 * rho * x * y + rho**2 * y**2) / (2 * (1 - rho**2))
    return jnp.sum(-0.5 * jnp.log(1 - rho**2) - quad, axis=-1)


def _true_mi(rho):
    return float(-0.5 * np.sum(np.log(1 - np.asarray(rho) ** 2)))


# Per-dimension correlations in R^4 (a zero dimension carries no information): MI 0.29 .. 1.66.
GAUSSIAN_CASES = [(0.5, 0.5, 0, 0), (0.8, 0, 0, 0), (0.6, 0.6, 0.6, 0.6), (0.9, 0.9, 0, 0)]


@pytest.fixture(scope="module")
def gaussian_estimates():
    """Per case and estimator: (mean, standard error) over 8 batches of N=1024 pairs, using each
    estimator's optimal critic: log r for infonce / nce (M=1) / js, 1 + log r for nwj.

    Each pair is its own class, and nce/nwj/js take their default (marginal) negatives: every
    candidate, the diagonal included. Those are draws from (1 - 1/N) p(x)p(y) + p(x, y)/N; the
    KL from the joint to that mixture is <= the MI (convexity), so the bounds still hold, and the
    tightness of nwj loses only about E_joint[r] / N <= 0.03 nats here."""
    n, batches = 1024, 8

    @jax.jit
    def run(keys, rhos, eye):  # eye as an argument: as a constant XLA would fold over it
        def one(args):
            key, rho = args
            s = _log_ratio(*_gaussian_pairs(key, n, rho.shape[0], rho), rho)
            return jnp.stack(
                [mi.infonce(s, eye), mi.nce(s, eye), mi.nwj(s + 1.0, eye), mi.js(s, eye)]
            )

        return jax.lax.map(one, (keys, rhos))

    cases = jnp.repeat(jnp.asarray(GAUSSIAN_CASES, jnp.float32), batches, axis=0)
    vals = np.asarray(run(_keys(100, cases.shape[0]), cases, jnp.eye(n)))
    vals = vals.reshape(len(GAUSSIAN_CASES), batches, len(ESTIMATORS))
    return {
        (rho, name): (vals[c, :, e].mean(), vals[c, :, e].std(ddof=1) / math.sqrt(batches))
        for c, rho in enumerate(GAUSSIAN_CASES)
        for e, name in enumerate(ESTIMATORS)
    }


@pytest.mark.parametrize("rho", GAUSSIAN_CASES)
def test_estimators_stay_below_true_mi(gaussian_estimates, rho):
    truth = _true_mi(rho)
    for name in ESTIMATORS:
        mean, se = gaussian_estimates[(rho, name)]
        # Monte-Carlo tolerance: 3 standard errors of the batch mean, plus float slack.
        assert mean <= truth + 3 * se + 1e-3, (name, mean, truth, se)


@pytest.mark.parametrize("rho", GAUSSIAN_CASES[1:])  # MI 0.5 .. 1.7 nats << log 1024 = 6.9
def test_infonce_and_nwj_are_tight_at_the_optimal_critic(gaussian_estimates, rho):
    truth = _true_mi(rho)
    for name in ("infonce", "nwj"):
        mean, _ = gaussian_estimates[(rho, name)]
        assert abs(mean - truth) <= 0.1 * truth, (name, mean, truth)


def test_trained_heads_estimate_rises_with_rho():
    n, d, steps = 128, 4, 200
    cfg = dict(estimator="infonce", temperature=0.1, head="mlp", embed_dim=16, hidden_dim=32)
    params0 = mi.init_heads(jax.random.PRNGKey(0), [(n, d)], **cfg)
    labels = jnp.arange(n)  # each pair is its own class: positives are the diagonal
    opt = optax.adam(3e-3)

    def loss_fn(params, key, rho):
        x, y = _gaussian_pairs(key, n, d, rho)
        return mi.mi_loss(params, real=(y,), syn=(x,), real_labels=labels, syn_labels=labels)[0]

    def train_and_eval(rho):
        def step(carry, key):
            params, state = carry
            updates, state = opt.update(jax.grad(loss_fn)(params, key, rho), state, params)
            return (optax.apply_updates(params, updates), state), None

        carry = (params0, opt.init(params0))
        (params, _), _ = jax.lax.scan(step, carry, _keys(1, steps))
        held_out = jax.vmap(lambda k: -loss_fn(params, k, rho))(_keys(2, 16))
        return held_out.mean()

    rhos = jnp.array([0.0, 0.3, 0.6, 0.9])
    est = np.asarray(jax.jit(jax.vmap(train_and_eval))(rhos))
    assert np.all(np.diff(est) > 0), est
    assert est[-1] > 1.0 and abs(est[0]) < 0.1, est


# ---- bounds that hold for any scores -------------------------------------------------------------


def test_infonce_never_exceeds_log_n_random():
    ns, nr, trials = 6, 40, 24
    k = _keys(0, 3)
    scale = jnp.repeat(jnp.array([0.1, 10.0, 1e4]), trials // 3)[:, None, None]
    scores = scale * jax.random.normal(k[0], (trials, ns, nr))
    pos = jax.random.bernoulli(k[1], 0.3, (trials, ns, nr)).astype(jnp.float32)
    pos = pos.at[:, :, 0].set(1.0)  # at least one positive per anchor
    single = jnp.broadcast_to(jnp.eye(ns, nr), pos.shape)
    # Fewer candidates for some anchors: drop columns, so N_i varies; the bound uses N_i.
    keep = jnp.arange(nr) < jax.random.randint(k[2], (trials, ns, 1), 2, nr + 1)
    values = jax.jit(jax.vmap(mi.infonce))(
        jnp.concatenate([scores, scores, scores]),
        jnp.concatenate([pos, single, pos * keep]),
        jnp.concatenate([1 - pos, 1 - single, (1 - pos) * keep]),
    )
    log_n = np.concatenate(
        [np.full(2 * trials, math.log(nr)), np.log(np.asarray(keep.sum(-1))).mean(-1)]
    )
    assert np.all(np.asarray(values[: 2 * trials]) <= log_n[: 2 * trials] + 1e-5)
    # With varying N_i the mean over anchors is bounded by the mean of log N_i.
    assert np.all(np.asarray(values[2 * trials :]) <= log_n[2 * trials :] + 1e-5)


def test_infonce_never_exceeds_log_n_adversarial():
    n = 32
    eye = jnp.eye(n)
    # The best a critic can do: each positive far above all its negatives -> exactly log N.
    perfect = jnp.where(eye > 0, 1e4, -1e4)
    np.testing.assert_allclose(float(mi.infonce(perfect, eye)), math.log(n), rtol=1e-6)
    # Gradient ascent on the scores themselves, unconstrained.
    scores = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    opt = optax.adam(0.5)
    state = opt.init(scores)
    grad = jax.jit(jax.grad(lambda s: -mi.infonce(s, eye)))
    for _ in range(150):
        updates, state = opt.update(grad(scores), state)
        scores = optax.apply_updates(scores, updates)
    value = float(mi.infonce(scores, eye))
    assert value <= math.log(n) + 1e-5
    assert value > math.log(n) - 0.05  # the ascent really pushed towards the ceiling


# ---- marginal negatives: MI bounds below log K ---------------------------------------------------


def _separable(arrangement, k=10, ns_per=2, nr_per=5):
    """K perfectly separated classes: one-hot class vectors (orthogonal) or a centred simplex
    (cosine -1/(K-1) between classes). Returns (z_syn, z_real, y_syn, y_real)."""
    ys, yr = jnp.repeat(jnp.arange(k), ns_per), jnp.repeat(jnp.arange(k), nr_per)
    e = jnp.eye(k)
    if arrangement == "simplex":
        e = e - e.mean(0)
    return e[ys], e[yr], ys, yr


@pytest.mark.parametrize("arrangement", ["onehot", "simplex"])
def test_separable_classes_every_estimator_stays_below_log_k(arrangement):
    k = 10
    zs, zr, ys, yr = _separable(arrangement, k)
    biases = jnp.linspace(-20.0, 20.0, 81)  # includes the critic offset that suits each estimator
    cases = list(itertools.product(ESTIMATORS, mi.NEGATIVES, (None, 7)))

    @jax.jit
    def estimates(b):
        def one(name, negatives, chunk):
            def f(bias):
                return mi.embedding_mi(
                    real=zr,
                    syn=zs,
                    real_labels=yr,
                    syn_labels=ys,
                    estimator=name,
                    temperature=0.07,
                    negatives=negatives,
                    chunk_size=chunk,
                    critic_params={"bias": bias},
                )

            return jax.vmap(f)(b)

        return [one(*case) for case in cases]

    vals = dict(zip(cases, (np.asarray(v) for v in estimates(biases)), strict=True))
    for (name, negatives, chunk), v in vals.items():
        np.testing.assert_allclose(v, vals[name, negatives, None], rtol=1e-4, atol=1e-4)
        if negatives == "marginal" or name == "infonce":  # infonce ignores `negatives`
            assert v.max() <= math.log(k) + 1e-4, (name, negatives, chunk, v.max())
    # At their best offset nwj and js reach log K: with separated classes the bound is tight.
    for name in ("nwj", "js"):
        assert vals[name, "marginal", None].max() > math.log(k) - 0.01
    # The other-class divergence is no MI bound: far above log K (14-16 nats here).
    for name in ("nce", "nwj", "js"):
        assert vals[name, "other_class", None].max() > math.log(k) + 1.0


def test_marginal_estimates_never_exceed_log_n_over_p():
    """With marginal negatives (beta = 0, no top-k) no scores lift an anchor above log(N / P):
    each positive adds at most max_f [f / P - e^(f-1) / N] = log(N / P) / P (nwj; js is nwj at
    f + 1; nce's h in (0, 1) gives less). Random scores, then scores pushed up by gradient
    ascent."""
    ns, nr, trials = 6, 40, 24
    k = _keys(11, 4)
    scale = jnp.repeat(jnp.array([0.1, 10.0, 1e4]), trials // 3)[:, None, None]
    scores = scale * jax.random.normal(k[0], (trials, ns, nr))
    pos = jax.random.bernoulli(k[1], 0.3, (trials, ns, nr)).astype(jnp.float32)
    pos = pos.at[:, :, 0].set(1.0)
    # Fewer candidates for some anchors: columns past a random count weigh 0 on both sides.
    keep = (jnp.arange(nr) < jax.random.randint(k[2], (trials, ns, 1), 2, nr + 1)).astype(
        jnp.float32
    )
    pos = pos * keep
    ceiling = np.log(np.asarray(keep.sum(-1) / pos.sum(-1))).mean(-1)  # [trials]
    for name in ESTIMATORS:
        fn = jax.jit(jax.vmap(lambda s, p, q, name=name: mi.estimate(name, s, p, q)))
        values = fn(scores, pos, mi.negative_weights(pos, name) * keep)
        assert np.all(np.asarray(values) <= ceiling + 1e-5), name

    # Adversarial: ascend each estimator's own gradient on the scores themselves.
    p0, q0 = pos[0], mi.negative_weights(pos[0], "nwj") * keep[0]
    opt = optax.adam(0.3)

    @functools.partial(jax.jit, static_argnums=0)
    def ascend(name, s):
        def step(carry, _):
            s, state = carry
            grad = jax.grad(lambda s: -mi.estimate(name, s, p0, q0))(s)
            updates, state = opt.update(grad, state)
            return (optax.apply_updates(s, updates), state), None

        (s, _), _ = jax.lax.scan(step, (s, opt.init(s)), None, length=300)
        return mi.estimate(name, s, p0, q0)

    for name in ("nce", "nwj", "js"):
        value = float(ascend(name, jax.random.normal(k[3], (ns, nr))))
        assert value <= ceiling[0] + 1e-5, (name, value, ceiling[0])
        if name != "nce":  # nwj and js (JS gradient, NWJ value) do reach the ceiling
            assert value > ceiling[0] - 0.05, (name, value, ceiling[0])


# ---- exact values on a hand-written problem ------------------------------------------------------

# Scores of 4 synthetic anchors (rows) against 5 real candidates (columns). Real labels 0 0 1 1 1
# and synthetic labels 0 1 1 2: rows with 2, 3, 3 and no positives (the last one is skipped).
HAND_SCORES = np.array(
    [
        [2.0, -1.0, 0.5, 1.5, -0.2],
        [0.3, 1.2, -0.7, 2.2, 0.9],
        [-1.5, 0.8, 1.1, 0.0, -0.4],
        [1.0, 1.0, 1.0, 1.0, 1.0],
    ],
    np.float32,
)
HAND_YR, HAND_YS = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 2])
HAND_POS = (HAND_YS[:, None] == HAND_YR[None, :]).astype(np.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _by_hand(name, s, p, q, n_data=None):
    """The docstrings' per-anchor formulas in float64; the mean over anchors with a positive."""
    out = []
    for s_i, p_i, q_i in zip(s.astype(np.float64), p, q, strict=True):
        n_p, n = p_i.sum(), q_i.sum()
        if n_p == 0:
            continue
        pos_mean = (p_i * s_i).sum() / n_p
        if name == "infonce":  # every candidate once: w = p + q
            w = p_i + q_i
            out.append(np.log(w.sum()) + pos_mean - np.log((w * np.exp(s_i)).sum()))
        elif name == "nce":  # h = e^s / (e^s + N / M)
            h = _sigmoid(s_i - np.log(n / (n_data or 1.0)))
            pos_log_h = (p_i * np.log(h)).sum() / n_p
            out.append(np.log(n) + pos_log_h + n * (q_i * np.log(1 - h)).sum() / n)
        elif name == "nwj":
            out.append(pos_mean - (q_i * np.exp(s_i - 1)).sum() / n)
        else:  # js: the nwj value at f + 1
            out.append(pos_mean + 1 - (q_i * np.exp(s_i)).sum() / n)
    return np.mean(out)


@pytest.mark.parametrize("negatives", mi.NEGATIVES)
def test_exact_values_on_a_hand_written_matrix(negatives):
    # Through the embedding path too: a bilinear critic with W = I on z_real = I, tau = 1 scores
    # exactly HAND_SCORES; labels give the positives.
    zs, zr = jnp.asarray(HAND_SCORES), jnp.eye(5)
    for name, n_data in [(e, None) for e in ESTIMATORS] + [("nce", 2.5)]:
        other = name == "infonce" or negatives == "other_class"
        q = 1 - HAND_POS if other else np.ones_like(HAND_POS)
        want = _by_hand(name, HAND_SCORES, HAND_POS, q, n_data)
        dense = mi.estimate(name, jnp.asarray(HAND_SCORES), jnp.asarray(HAND_POS), q, n_data=n_data)
        np.testing.assert_allclose(dense, want, rtol=1e-5, err_msg=name)
        if negatives == "marginal":  # the default negatives are the marginal ones
            default = mi.estimate(name, jnp.asarray(HAND_SCORES), HAND_POS, n_data=n_data)
            np.testing.assert_allclose(default, want, rtol=1e-5, err_msg=name)
        for chunk in (None, 2):
            got = mi.embedding_mi(
                real=zr,
                syn=zs,
                real_labels=jnp.asarray(HAND_YR),
                syn_labels=jnp.asarray(HAND_YS),
                estimator=name,
                critic="bilinear",
                temperature=1.0,
                negatives=negatives,
                n_data=n_data,
                chunk_size=chunk,
            )
            np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{name} chunk {chunk}")


@pytest.mark.parametrize("negatives", mi.NEGATIVES)
def test_js_gradient_has_its_closed_form(negatives):
    """d js / d s_ij = [p_ij sigmoid(-s_ij) / P_i - q_ij sigmoid(s_ij) / N_i] / A, A = number of
    anchors with a positive: the JS objective's gradient, for plain and hard-negative weights."""
    s, p = HAND_SCORES, HAND_POS
    q = mi.negative_weights(jnp.asarray(p), "js", negatives=negatives)
    for beta in (0.0, 1.0):
        weights = np.asarray(mi.hard_negative_weights(jnp.asarray(s), q, beta))
        grad = jax.grad(lambda x, w=weights: mi.js(x, p, w))(jnp.asarray(s))
        n_p, n = p.sum(1, keepdims=True), weights.sum(1, keepdims=True)
        anchors = n_p > 0
        want = (
            np.where(
                anchors,
                p * _sigmoid(-s) / np.where(anchors, n_p, 1) - weights * _sigmoid(s) / n,
                0.0,
            )
            / anchors.sum()
        )
        np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["infonce", "nce"])
def test_soft_labels_get_no_gradient_through_the_pair_weights(estimator):
    zs, zr, _, yr = _random_problem(6, ns=9, nr=23)
    logits = jax.random.normal(jax.random.PRNGKey(9), (9, 3))
    for chunk in (None, 5):

        def f(lg, chunk=chunk):
            soft = jax.nn.softmax(lg)
            return mi.embedding_mi(
                real=zr,
                syn=zs,
                real_labels=yr,
                syn_labels=soft,
                mask="soft",
                estimator=estimator,
                chunk_size=chunk,
            )

        value, grad = jax.value_and_grad(f)(logits)
        assert float(jnp.abs(grad).max()) == 0.0, chunk
        assert abs(float(f(2.0 * logits)) - float(value)) > 1e-4  # the labels do weigh the pairs


# ---- numerics and gradients ----------------------------------------------------------------------


def _grads_for_every_estimator(params, real, syn, real_labels, syn_labels, **cfg):
    """{estimator: (loss, grads wrt (params, real, syn))}, all in one traced function."""
    out = {}
    for name in ESTIMATORS:

        def loss(p, r, s, name=name):
            heads = _with(p, estimator=name, **cfg)
            return mi.mi_loss(heads, real=r, syn=s, real_labels=real_labels, syn_labels=syn_labels)[
                0
            ]

        out[name] = jax.value_and_grad(loss, (0, 1, 2))(params, real, syn)
    return out


@pytest.mark.parametrize("temperature,chunk", [(0.01, None), (1e-4, 7)])
def test_gradients_finite_and_reach_features_and_heads(temperature, chunk):
    real, syn, yr, ys = _feats(0, shapes=((4, 4, 3),))
    cfg = dict(temperature=temperature, chunk_size=chunk)  # 1e-4: cosine scores of size 1e4
    params = mi.init_heads(jax.random.PRNGKey(1), [f.shape for f in real], **cfg)
    fn = jax.jit(functools.partial(_grads_for_every_estimator, **cfg))
    for name, (loss, grads) in fn(params, real, syn, yr, ys).items():
        assert np.isfinite(float(loss)), name
        for leaf in jax.tree_util.tree_leaves(grads):
            assert np.all(np.isfinite(leaf)), name
        if temperature < 0.01:
            continue  # scores of 1e4 saturate every bound: finite is all one can ask there
        g_params, g_real, g_syn = grads
        assert float(jnp.abs(g_real[0]).max()) > 0, name
        assert float(jnp.abs(g_syn[0]).max()) > 0, name
        for leaf in jax.tree_util.tree_leaves(g_params[0]["proj"]):
            assert float(jnp.abs(leaf).max()) > 0, name
        if name != "infonce":  # infonce is shift-invariant per anchor: no gradient for the bias
            assert float(jnp.abs(g_params[0]["bias"])) > 0, name


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_huge_scores_give_finite_values_and_gradients(estimator):
    k = _keys(3, 2)
    scores = 1e4 * jax.random.normal(k[0], (9, 40))
    pos = jax.random.bernoulli(k[1], 0.3, (9, 40)).astype(jnp.float32).at[:, 0].set(1.0)
    for beta, neg in itertools.product((0.0, 2.0), (1 - pos, jnp.ones_like(pos))):
        value, grad = jax.value_and_grad(
            lambda s, b=beta, q=neg: mi.estimate(
                estimator, s, pos, mi.hard_negative_weights(s, q, b)
            )
        )(scores)
        assert np.isfinite(float(value))
        assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0


# ---- streaming, vmap, permutation, jit -----------------------------------------------------------


# Streamed negatives (plain, or tilted by beta) with top-k positives, streamed positives with
# top-k negatives, or both selected; nce/nwj/js with their default (marginal) negatives and with
# the other-class ones. 37 real candidates in chunks of 8: 4 full and a padded one.
CHUNK_CASES = [
    ("infonce", {}),
    ("infonce", dict(beta=0.7, k_pos=2)),
    ("nce", dict(beta=0.7, k_neg=5, n_data=3.0)),
    ("nce", dict(negatives="other_class", beta=0.7, k_neg=5)),
    ("nwj", dict(beta=0.7, k_pos=2)),
    ("nwj", dict(negatives="other_class", k_neg=4)),
    ("js", dict(k_neg=50, k_pos=1)),  # k_neg above the number of candidates: empty slots
    ("js", dict(negatives="other_class", beta=0.3)),
]


@pytest.mark.parametrize("estimator,extra", CHUNK_CASES)
def test_chunked_equals_one_shot(estimator, extra):
    zs, zr, ys, yr = _random_problem(0, ns=11, nr=37)
    cfg = dict(estimator=estimator, temperature=0.5, **extra)

    @jax.jit
    def both(a, b):
        def f(a, b, chunk):
            return mi.embedding_mi(
                real=b, syn=a, real_labels=yr, syn_labels=ys, chunk_size=chunk, **cfg
            )

        return [jax.value_and_grad(f, (0, 1))(a, b, chunk) for chunk in (None, 8)]

    (v1, g1), (v2, g2) = both(zs, zr)
    np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_vmap_over_layers_equals_loop():
    layers, shape = 3, (2, 2, 5)
    real, syn, yr, ys = _feats(1, shapes=(shape,) * layers)
    cfg = dict(estimator="nce", temperature=0.2, reduce="flatten", k_neg=6)
    params = mi.init_heads(jax.random.PRNGKey(2), [f.shape for f in real], **cfg)
    one = jax.jit(
        lambda p, r, s: mi.layer_mi(
            mi.Heads((p,), params.config), 0, real=r, syn=s, real_labels=yr, syn_labels=ys
        )
    )
    stacked = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *params.params)
    vmapped, emb = jax.jit(jax.vmap(one))(stacked, jnp.stack(real), jnp.stack(syn))
    for layer in range(layers):
        v, e = one(params[layer], real[layer], syn[layer])
        np.testing.assert_allclose(vmapped[layer], v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(emb[layer], e, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def two_layer_problem():
    """Real/synthetic features for two layers, labels, and default heads for them."""
    real, syn, yr, ys = _feats(2)
    return real, syn, yr, ys, mi.init_heads(jax.random.PRNGKey(3), [f.shape for f in real])


@pytest.mark.parametrize("chunk", [None, 6])
def test_permutation_invariance(two_layer_problem, chunk):
    real, syn, yr, ys, params = two_layer_problem
    cfg = dict(estimator="infonce", temperature=0.1, chunk_size=chunk, beta=0.5)
    pr = jax.random.permutation(jax.random.PRNGKey(4), yr.shape[0])
    ps = jax.random.permutation(jax.random.PRNGKey(5), ys.shape[0])
    heads = _with(params, **cfg)
    estimates = jax.jit(
        lambda r, s, a, b: mi.mi_loss(heads, real=r, syn=s, real_labels=a, syn_labels=b)[1]["mi"]
    )
    base = estimates(real, syn, yr, ys)
    permuted = estimates(tuple(r[pr] for r in real), tuple(s[ps] for s in syn), yr[pr], ys[ps])
    np.testing.assert_allclose(permuted, base, rtol=1e-5, atol=1e-6)
    # Not vacuous: breaking the label/sample alignment does change the estimate.
    shuffled = estimates(real, syn, yr[pr], ys)
    assert not np.allclose(shuffled, base, rtol=1e-3)


def test_every_public_function_jits():
    zs, zr, ys, yr = _random_problem(4)
    scores = mi.critic_scores(real=zr, syn=zs, temperature=0.2)
    pos = mi.positive_mask(real_labels=yr, syn_labels=ys)
    bank = mi.update_memory_bank(mi.init_memory_bank(3, 4, 8), zr, yr)
    cfg = dict(estimator="js", temperature=0.2, critic="bilinear", head="mlp", chunk_size=9)
    cfg.update(embed_dim=8, hidden_dim=16, beta=0.5, k_neg=4)
    heads = mi.init_heads(jax.random.PRNGKey(0), [(8,)], **cfg)
    fitted = mi.Heads(({"bias": jnp.zeros(())},), mi.make_config(head="none", reduce="flatten"))
    soft = jax.nn.softmax(zs[:, :3])
    P = functools.partial

    cases = [
        (mi.l2_normalize, (zs,)),
        (
            lambda a, b: mi.critic_scores(real=b, syn=a, critic="bilinear", temperature=0.3),
            (zs, zr),
        ),
        (lambda a, b: mi.positive_mask(real_labels=b, syn_labels=a, mode="soft"), (soft, yr)),
        (mi.infonce, (scores, pos)),
        (P(mi.nce, n_data=100.0), (scores, pos)),
        (mi.nwj, (scores, pos)),
        (mi.js, (scores, pos)),
        (P(mi.estimate, "nwj"), (scores, pos)),
        (P(mi.hard_negative_weights, beta=1.0), (scores, 1 - pos)),
        (P(mi.select_topk, k_pos=2, k_neg=3), (scores, pos)),
        (P(mi.negative_weights, estimator="nwj"), (pos,)),
        (lambda a, b: mi.standardize(real=a, syn=b), (zr, zs)),
        (lambda h, a, b, y: mi.embed(h, 0, real=a, syn=b, real_labels=y), (fitted, zr, zs, yr)),
        (P(mi.reduce_features, mode="gap"), (zs.reshape(12, 2, 2, 2),)),
        (mi.ProjectionHead(kind="mlp", dim=8, hidden=16).init, (jax.random.PRNGKey(0), zs)),
        (lambda k: mi.init_heads(k, [(8,)], **cfg), (jax.random.PRNGKey(1),)),
        (lambda: mi.init_memory_bank(3, 4, 8), ()),
        (P(mi.update_memory_bank, momentum=0.9), (bank, zr, yr)),
        (mi.bank_candidates, (bank,)),
        (mi.relative_weight, ({"a": zs, "b": zr}, {"a": 2 * zs, "b": zr}, 0.5)),
    ]

    # mi_loss (-> layer_mi -> embedding_mi: streamed, bank, top-k, tilt) is checked against its
    # one-shot self; layer_mi and embedding_mi alone are also jitted in the vmap/chunk tests.
    def loss(h, r, s, a, b):
        return mi.mi_loss(h, real=r, syn=s, real_labels=a, syn_labels=b, banks=(bank,))

    args = (heads, (zr,), (zs,), yr, ys)
    cases.append((loss, args))
    eager = [fn(*a) for fn, a in cases[:-1]]
    eager.append(loss(_with(heads, **{**cfg, "chunk_size": None}), *args[1:]))
    # One jit around all of them: each is traced and compiled as part of a jitted program.
    jitted = jax.jit(lambda all_args: [fn(*a) for (fn, _), a in zip(cases, all_args, strict=True)])(
        [a for _, a in cases]
    )
    for e, j in zip(eager, jitted, strict=True):
        for a, b in zip(jax.tree_util.tree_leaves(e), jax.tree_util.tree_leaves(j), strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


# ---- pair selection ------------------------------------------------------------------------------


def _selection_problem(seed=0, ns=8, nr=50):
    k = _keys(seed, 2)
    scores = 3.0 * jax.random.normal(k[0], (ns, nr))
    labels_s = jnp.arange(ns) % 4
    labels_r = jax.random.randint(k[1], (nr,), 0, 4)
    return scores, mi.positive_mask(real_labels=labels_r, syn_labels=labels_s)


@pytest.mark.parametrize("negatives", mi.NEGATIVES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_hard_negative_weighting_never_raises_the_estimate(estimator, negatives):
    scores, pos = _selection_problem()
    neg = mi.negative_weights(pos, estimator, negatives=negatives)
    values = [
        float(mi.estimate(estimator, scores, pos, mi.hard_negative_weights(scores, neg, b)))
        for b in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    ]
    assert values[0] == float(mi.estimate(estimator, scores, pos, neg))  # beta = 0: plain
    assert all(b <= a + 1e-5 * abs(a) for a, b in zip(values, values[1:], strict=False)), values
    assert values[-1] < values[0] - 1e-3  # and it does something


def test_hard_negative_weights_properties():
    scores, pos = _selection_problem()
    neg = 1 - pos
    assert mi.hard_negative_weights(scores, neg, 0.0) is neg
    w = mi.hard_negative_weights(scores, neg, 1.0)
    np.testing.assert_allclose(w.sum(-1), neg.sum(-1), rtol=1e-5)  # same negative mass
    assert float(jnp.abs(jnp.where(pos > 0, w, 0)).max()) == 0.0  # positives get no weight
    row = np.asarray(jnp.where(neg[0] > 0, scores[0], -np.inf))
    hardest, easiest = int(np.argmax(row)), int(np.argmin(np.where(row > -np.inf, row, np.inf)))
    assert w[0, hardest] > 1.0 > w[0, easiest]
    w2 = mi.hard_negative_weights(scores, neg, 3.0)
    assert w2[0, hardest] > w[0, hardest]  # larger beta concentrates more
    grad = jax.grad(lambda s: jnp.sum(mi.hard_negative_weights(s, neg, 1.0) * s))(scores)
    np.testing.assert_allclose(grad, w, rtol=1e-6)  # weights are constants for the gradient


def test_select_topk_picks_the_hardest_pairs():
    scores, pos = _selection_problem()
    s, p, q = mi.select_topk(scores, pos, k_pos=3, k_neg=5)
    assert s.shape == (scores.shape[0], 8)
    for i in range(scores.shape[0]):
        row, mask = np.asarray(scores[i]), np.asarray(pos[i]) > 0
        want_pos = np.sort(row[mask])[:3]
        want_neg = np.sort(row[~mask])[::-1][:5]
        np.testing.assert_allclose(
            np.sort(np.asarray(s[i, :3])[np.asarray(p[i, :3]) > 0]), np.sort(want_pos)
        )
        np.testing.assert_allclose(np.sort(np.asarray(s[i, 3:])), np.sort(want_neg))
    assert float(q[:, :3].sum()) == 0 and float(p[:, 3:].sum()) == 0


def test_topk_ceiling_and_no_op():
    scores, pos = _selection_problem()
    k_pos, k_neg = 2, 6
    s, p, q = mi.select_topk(scores, pos, k_pos=k_pos, k_neg=k_neg)
    assert float(mi.infonce(s, p, q)) <= math.log(k_pos + k_neg) + 1e-5
    perfect = jnp.where(pos > 0, 1e4, -1e4)  # the ceiling is reached by a perfect critic
    s, p, q = mi.select_topk(perfect, pos, k_pos=1, k_neg=k_neg)
    np.testing.assert_allclose(mi.infonce(s, p, q), math.log(1 + k_neg), rtol=1e-6)
    # k at least the counts: no selection at all (nce's default negatives: every candidate).
    s, p, q = mi.select_topk(scores, pos, mi.negative_weights(pos, "nce"), k_pos=50, k_neg=50)
    np.testing.assert_allclose(mi.nce(s, p, q), mi.nce(scores, pos), rtol=1e-6)


def _random_subset(weights, seed, k):
    """Per row, k of the entries with weight > 0 (all if fewer), chosen at random."""
    noise = jax.random.uniform(jax.random.PRNGKey(seed), weights.shape)
    keep = jax.lax.top_k(jnp.where(weights > 0, noise, -1.0), k)[1]
    rows = jnp.arange(weights.shape[0])[:, None]
    return jnp.zeros_like(weights).at[rows, keep].set(1.0) * weights


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_topk_is_never_above_random_subsets(estimator):
    scores, pos = _selection_problem()
    neg = mi.negative_weights(pos, estimator)  # nce/nwj/js: every candidate, same label included
    # Hardest negatives: the largest negative term among all k-subsets.
    hard = float(mi.estimate(estimator, *mi.select_topk(scores, pos, neg, k_neg=6)))
    for seed in range(3):
        rand = float(mi.estimate(estimator, scores, pos, _random_subset(neg, seed, 6)))
        assert hard <= rand + 1e-5 * abs(rand), (hard, rand)
    # Hardest positives: the smallest positive term (InfoNCE: only for a single positive).
    k_pos = 1 if estimator == "infonce" else 3
    hard = float(mi.estimate(estimator, *mi.select_topk(scores, pos, neg, k_pos=k_pos)))
    for seed in range(3):
        rand = float(mi.estimate(estimator, scores, _random_subset(pos, seed, k_pos), neg))
        assert hard <= rand + 1e-5 * abs(rand), (hard, rand)


# ---- fitted heads: "none" and "lda" --------------------------------------------------------------


def _common_component_problem(seed=0, classes=3, n_real=30, n_syn=4, dim=16):
    """Features c + small class signal + noise: every raw feature vector is nearly parallel to the
    shared component c (like pooled features after instance norm + ReLU).
    Returns (real [90, 16], syn [12, 16], y_real, y_syn)."""
    k = _keys(seed, 4)
    common = 20.0 + jax.random.uniform(k[0], (dim,))
    centres = 0.5 * jax.random.normal(k[1], (classes, dim))
    yr, ys = jnp.repeat(jnp.arange(classes), n_real), jnp.repeat(jnp.arange(classes), n_syn)
    real = common + centres[yr] + 0.1 * jax.random.normal(k[2], (yr.shape[0], dim))
    syn = common + centres[ys] + 0.1 * jax.random.normal(k[3], (ys.shape[0], dim))
    return real, syn, yr, ys


def test_fitted_heads_cancel_the_common_component():
    real, syn, yr, ys = _common_component_problem()
    unit = mi.l2_normalize(real)
    assert float((unit @ unit.T).min()) > 0.998  # the set-up: raw features all but parallel
    # plain cosine of the raw features
    raw = float(mi.embedding_mi(real=real, syn=syn, real_labels=yr, syn_labels=ys))
    fitted = {
        h: mi.Heads(({"bias": jnp.zeros(())},), mi.make_config(head=h)) for h in mi.FITTED_HEADS
    }
    est = {
        head: float(mi.layer_mi(heads, 0, real=real, syn=syn, real_labels=yr, syn_labels=ys)[0])
        for head, heads in fitted.items()
    }
    assert raw < 0.05, raw  # cosine/tau is ~1/tau for every pair: no information left
    assert est["none"] > raw + 0.5, (est, raw)  # measured: 1.01 vs 0.007
    assert est["none"] - 1e-6 <= est["lda"] <= math.log(3) + 1e-5, est  # measured: 1.098


@pytest.mark.parametrize("head", mi.FITTED_HEADS)
def test_fitted_heads_gradient_skips_the_fitted_statistics(head):
    """The gradient reaches both feature sets, as if the real batch's mean / std (and the LDA
    projection) were constants: compared with the same computation on numpy constants."""
    real, syn, yr, ys = _common_component_problem(1)
    real, syn = real.reshape(-1, 2, 2, 4), syn.reshape(-1, 2, 2, 4)  # flattened back by "flatten"
    cfg = dict(head=head, reduce="flatten", estimator="nce", temperature=0.2)
    bias = jnp.asarray(0.3)
    flat = np.asarray(real, np.float64).reshape(real.shape[0], -1)
    var = flat.var(0)
    mean, inv_std = flat.mean(0), 1.0 / np.sqrt(var + critics._VAR_FLOOR * var.mean() + 1e-12)
    proj = np.eye(flat.shape[1])
    if head == "lda":
        proj = np.asarray(mi.lda_projection(jnp.asarray((flat - mean) * inv_std), yr))

    def by_hand(r, s):
        def z(x):
            x = (x.reshape(x.shape[0], -1) - mean.astype(np.float32)) * inv_std.astype(np.float32)
            return mi.l2_normalize(x @ proj.astype(np.float32))

        return mi.embedding_mi(
            real=z(r), syn=z(s), real_labels=yr, syn_labels=ys, critic_params={"bias": bias}, **cfg
        )

    def library(r, s):
        heads = mi.Heads(({"bias": bias},), mi.make_config(**cfg))
        return mi.layer_mi(heads, 0, real=r, syn=s, real_labels=yr, syn_labels=ys)[0]

    v1, g1 = jax.value_and_grad(library, (0, 1))(real, syn)
    v2, g2 = jax.value_and_grad(by_hand, (0, 1))(real, syn)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1, g2, strict=True):
        assert np.all(np.isfinite(a)) and float(jnp.abs(a).max()) > 0
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 * float(jnp.abs(b).max()))


def test_lda_dual_equals_primal_and_keeps_at_most_k_minus_1_directions():
    n, d, classes = 24, 40, 4
    k = _keys(12, 3)
    labels = jnp.arange(n) % classes
    x = jax.random.normal(k[0], (n, d)) + 2.0 * jax.random.normal(k[1], (classes, d))[labels]
    probe = jax.random.normal(k[2], (7, d))  # points off the samples' span too
    dual = mi.lda_projection(x, labels)  # D > N: fitted in the span of the samples
    primal = critics._lda_projection(x, labels, mi.LDA_SHRINKAGE, False)
    assert dual.shape == (d, n) and primal.shape == (d, d)
    for pts in (x, probe):
        a, b = pts @ dual, pts @ primal  # the critic only sees inner products
        gram_a, gram_b = np.asarray(a @ a.T), np.asarray(b @ b.T)
        np.testing.assert_allclose(gram_a, gram_b, rtol=1e-3, atol=1e-3 * np.abs(gram_b).max())
    sv = np.linalg.svd(np.asarray(primal), compute_uv=False)
    assert np.sum(sv > 1e-3 * sv[0]) == classes - 1, sv[:6]
    one_hot = jax.nn.one_hot(labels, classes)  # [N, K] labels: the argmax
    np.testing.assert_allclose(mi.lda_projection(x, one_hot), dual, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(mi.lda_projection(x, labels)))(x)
    assert float(jnp.abs(grad).max()) == 0.0  # a fitted constant
    # Under jit (float32 eigh: agreement to ~1e-4; directions are defined up to sign).
    jitted = jax.jit(mi.lda_projection)(x, labels)
    np.testing.assert_allclose(jitted @ jitted.T, dual @ dual.T, rtol=1e-3, atol=1e-5)


def test_fitted_heads_have_only_a_critic_offset():
    real, syn, yr, ys = _feats(3)
    shapes = [f.shape for f in real]
    for head in mi.FITTED_HEADS:
        cfg = dict(head=head, estimator="nwj", temperature=0.5)
        params = mi.init_heads(jax.random.PRNGKey(0), shapes, **cfg)
        assert [set(p) for p in params.params] == [{"bias"}] * len(shapes)
        assert float(params[0]["bias"]) == -2.0  # nwj starts at -1/temperature: scores <= 0
        (loss, aux), grads = jax.jit(
            jax.value_and_grad(
                lambda p: mi.mi_loss(p, real=real, syn=syn, real_labels=yr, syn_labels=ys),
                has_aux=True,
            )
        )(params)
        assert np.isfinite(float(loss)) and aux["mi"].shape == (len(shapes),)
        assert all(float(jnp.abs(g["bias"])) > 0 for g in grads.params)
        opt = optax.adam(1e-2)  # the state's optimiser works on them as on trained heads
        updates, _ = opt.update(grads, opt.init(params), params)
        assert optax.apply_updates(params, updates)[0]["bias"] != params[0]["bias"]
        width = {"none": (4 * 4 * 3,), "lda": (yr.shape[0],)}[head]  # flatten: 48 > N = 20
        flat = _with(params, reduce="flatten", **cfg)
        z_real, z_syn = mi.embed(flat, 0, real=real[0], syn=syn[0], real_labels=yr)
        assert z_real.shape == (yr.shape[0], *width) and z_syn.shape == (ys.shape[0], *width)
    # infonce is shift-invariant, so its offset stays 0.
    assert float(mi.init_heads(jax.random.PRNGKey(0), shapes, head="none")[0]["bias"]) == 0.0
    # Every leaf its own buffer: the distillation step donates the heads.
    donate = jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)
    for head in ("linear", "none"):
        donate(mi.init_heads(jax.random.PRNGKey(0), shapes, head=head, estimator="js"))


def test_fitted_heads_refuse_a_memory_bank_at_config_time():
    from mim4dd_jax import config as config_lib

    for head in mi.FITTED_HEADS:
        with pytest.raises(ConfigError, match="bank"):
            mi.make_config(head=head, bank_slots=2)
        c = config_lib.build({"name": "fake"}, "dm,ipc1")
        for dotted, value in {"mi.weight": 0.5, "mi.head": head, "mi.bank_slots": 2}.items():
            config_lib.set_dotted(c, dotted, value)
        with pytest.raises(ConfigError, match="bank"):
            config_lib.validate(c)
        config_lib.set_dotted(c, "mi.bank_slots", 0)
        config_lib.validate(c)  # the same config without a bank is fine


# ---- memory bank ---------------------------------------------------------------------------------


def test_memory_bank_update_is_pure_and_momentum_exact():
    bank0 = mi.init_memory_bank(num_classes=2, slots=2, dim=4)
    z1, z2 = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
    u1, u2 = np.asarray(mi.l2_normalize(z1)), np.asarray(mi.l2_normalize(z2))
    update = jax.jit(functools.partial(mi.update_memory_bank, momentum=0.25))
    bank1 = update(bank0, z1, jnp.array([0, 1, 0]))
    assert float(jnp.abs(bank0["emb"]).max()) == 0.0  # the input bank is untouched
    np.testing.assert_allclose(bank1["emb"][0], u1[[0, 2]], rtol=1e-6)  # empty slots: copies
    np.testing.assert_allclose(bank1["emb"][1, 0], u1[1], rtol=1e-6)
    np.testing.assert_array_equal(bank1["ptr"], [0, 1])  # class 0 wrapped around
    np.testing.assert_array_equal(bank1["filled"], [2, 1])
    # Class 1 gets 3 samples for 2 slots: the last two stay, written at ptr=1, then wrapping to 0.
    bank2 = update(bank1, z2, jnp.array([1, 1, 1]))
    np.testing.assert_allclose(bank2["emb"][1, 1], u2[1], rtol=1e-6)  # was empty: copy
    want = mi.l2_normalize(0.25 * bank1["emb"][1, 0] + 0.75 * z2[2])  # was filled: momentum
    np.testing.assert_allclose(bank2["emb"][1, 0], want, rtol=1e-6)
    np.testing.assert_allclose(bank2["emb"][0], bank1["emb"][0])  # other classes untouched
    np.testing.assert_array_equal(bank2["ptr"], [0, 1])
    np.testing.assert_array_equal(bank2["filled"], [2, 2])
    emb, lab, valid = mi.bank_candidates(bank1)
    np.testing.assert_array_equal(lab, [0, 0, 1, 1])
    np.testing.assert_array_equal(valid, [1, 1, 1, 0])


def test_memory_bank_adds_negatives_as_constant_candidates():
    k = _keys(7, 4)
    real, syn = jax.random.normal(k[0], (10, 6)), jax.random.normal(k[1], (4, 6))
    yr, ys = jax.random.randint(k[2], (10,), 0, 3), jnp.array([0, 1, 2, 0])
    cfg = dict(estimator="infonce", temperature=0.2, embed_dim=8)
    params = mi.init_heads(jax.random.PRNGKey(8), [(1, 6)], **cfg)[0]
    heads = mi.init_heads(jax.random.PRNGKey(8), [(1, 6)], **cfg)
    layer_mi = jax.jit(
        lambda p, b: mi.layer_mi(
            mi.Heads((p,), heads.config),
            0,
            real=real,
            syn=syn,
            real_labels=yr,
            syn_labels=ys,
            bank=b,
        )
    )
    layer = lambda p, b: layer_mi(p, b)[0]
    empty = mi.init_memory_bank(3, 2, 8)  # an empty bank changes nothing
    z_real = layer_mi(params, empty)[1]
    bank = mi.update_memory_bank(mi.init_memory_bank(3, 2, 8), z_real[:5], yr[:5])
    emb, lab, valid = mi.bank_candidates(bank)
    z_syn = mi.ProjectionHead(dim=8).apply(params["proj"], syn)
    keep = np.asarray(valid) > 0
    assert 0 < keep.sum() < keep.size  # some slots filled, some empty
    direct = mi.embedding_mi(
        real=jnp.concatenate([z_real, emb[keep]]),
        syn=z_syn,
        real_labels=jnp.concatenate([yr, lab[keep]]),
        syn_labels=ys,
        critic_params={"bias": params["bias"]},
        **cfg,
    )
    np.testing.assert_allclose(layer(params, bank), direct, rtol=1e-5)
    no_bank = mi.embedding_mi(
        real=z_real,
        syn=z_syn,
        real_labels=yr,
        syn_labels=ys,
        critic_params={"bias": params["bias"]},
        **cfg,
    )
    np.testing.assert_allclose(layer(params, empty), no_bank, rtol=1e-6)
    assert abs(float(layer(params, bank)) - float(layer(params, empty))) > 1e-4
    grad = jax.grad(lambda e: layer(params, {**bank, "emb": e}))(bank["emb"])
    assert float(jnp.abs(grad).max()) == 0.0


# ---- scores, masks, heads ------------------------------------------------------------------------


def test_positive_mask_hard_soft_and_similarity():
    ys, yr = jnp.array([0, 1, 2]), jnp.array([2, 0, 0, 1])
    want = np.array([[0, 1, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(mi.positive_mask(real_labels=yr, syn_labels=ys), want)
    soft = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.3, 0.3, 0.4]])
    hard = mi.positive_mask(real_labels=yr, syn_labels=soft)
    np.testing.assert_array_equal(hard, want)  # hard: via the argmax
    sim = mi.positive_mask(real_labels=yr, syn_labels=soft, mode="soft")
    np.testing.assert_allclose(sim, np.asarray(soft)[:, np.asarray(yr)], rtol=1e-6)
    np.testing.assert_array_equal(
        mi.positive_mask(real_labels=yr, syn_labels=ys, mode="soft"), want
    )


def test_scores_critics_and_heads():
    zs, zr, _, _ = _random_problem(5)
    cos = mi.critic_scores(real=zr, syn=zs, temperature=0.5)
    want = np.asarray(mi.l2_normalize(zs) @ mi.l2_normalize(zr).T) / 0.5
    np.testing.assert_allclose(cos, want, rtol=1e-5)
    assert float(jnp.abs(cos).max()) <= 2.0 + 1e-5
    us, ur = mi.l2_normalize(zs), mi.l2_normalize(zr)
    eye = jnp.eye(zs.shape[1])
    np.testing.assert_allclose(
        mi.critic_scores(real=ur, syn=us, critic="bilinear", weight=eye),
        us @ ur.T / 0.07,
        rtol=1e-5,
    )
    w = jax.random.normal(jax.random.PRNGKey(0), (8, 8))
    np.testing.assert_allclose(
        mi.critic_scores(real=zr, syn=zs, critic="bilinear", weight=w, temperature=2.0, bias=1.0),
        zs @ w @ zr.T / 2.0 + 1.0,
        rtol=1e-5,
        atol=1e-5,
    )
    feats = jax.random.normal(jax.random.PRNGKey(1), (5, 3, 3, 4))
    assert mi.reduce_features(feats, "flatten").shape == (5, 36)
    np.testing.assert_allclose(mi.reduce_features(feats, "gap"), feats.mean((1, 2)), rtol=1e-6)
    cfg = dict(head="mlp", reduce="flatten", embed_dim=7, hidden_dim=9, critic="bilinear")
    shape = jax.ShapeDtypeStruct((2, 3, 3, 4), jnp.float32)
    (p,) = mi.init_heads(jax.random.PRNGKey(2), [shape], **cfg)
    assert p["proj"]["params"]["hidden"]["kernel"].shape == (36, 9)
    assert p["proj"]["params"]["out"]["kernel"].shape == (9, 7)
    np.testing.assert_array_equal(p["w"], np.eye(7))
    z = mi.ProjectionHead(kind="mlp", reduce="flatten", dim=7, hidden=9).apply(p["proj"], feats)
    assert z.shape == (5, 7)
    np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, rtol=1e-5)
    (p,) = mi.init_heads(jax.random.PRNGKey(2), [(2, 3, 3, 4)], embed_dim=7)  # linear, gap
    assert set(p) == {"proj", "bias"} and p["proj"]["params"]["out"]["kernel"].shape == (4, 7)


def test_layer_weights_make_a_weighted_sum(two_layer_problem):
    real, syn, yr, ys, params = two_layer_problem
    cfg = dict(estimator="nwj", temperature=0.5, layer_weights=(0.25, 2.0))
    loss, aux = jax.jit(mi.mi_loss)(
        _with(params, **cfg), real=real, syn=syn, real_labels=yr, syn_labels=ys
    )
    assert aux["mi"].shape == (2,)
    np.testing.assert_allclose(loss, -(0.25 * aux["mi"][0] + 2.0 * aux["mi"][1]), rtol=1e-6)
    assert [z.shape for z in aux["real_embeddings"]] == [(yr.shape[0], 128)] * 2


# ---- configuration errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        dict(estimator="mine"),
        dict(temperature=0.0),
        dict(temperature=-1.0),
        dict(critic="dot"),
        dict(reduce="max"),
        dict(head="transformer"),
        dict(mask="fuzzy"),
        dict(beta=-0.1),
        dict(k_pos=0),
        dict(k_neg=2.5),
        dict(chunk_size=0),
        dict(n_data=0),
        dict(layer_weights=(1.0, -1.0)),
        dict(mask="soft", k_neg=3),
        dict(temprature=0.1),
        dict(negatives="random"),
        dict(bank_slots=-1),
        dict(bank_slots=True),
        dict(head="none", critic="bilinear"),
        dict(head="lda", bank_slots=4),
    ],
)
def test_bad_config_raises_config_error(two_layer_problem, bad):
    real, syn, yr, ys, params = two_layer_problem
    with pytest.raises(ConfigError):
        mi.mi_loss(params, real=real, syn=syn, real_labels=yr, syn_labels=ys, **bad)


def test_bad_arguments_raise_config_error(two_layer_problem):
    scores, pos = _selection_problem()
    real, syn, yr, ys, params = two_layer_problem
    calls = [
        lambda: mi.estimate("mine", scores, pos),
        lambda: mi.critic_scores(real=scores, syn=scores, temperature=0),
        lambda: mi.hard_negative_weights(scores, 1 - pos, -1.0),
        lambda: mi.select_topk(scores, pos, k_neg=0),
        lambda: mi.nce(scores, pos, n_data=-3.0),
        lambda: mi.update_memory_bank(
            mi.init_memory_bank(2, 2, 3), jnp.ones((1, 3)), jnp.zeros(1, int), momentum=1.0
        ),
        lambda: mi.mi_loss(
            _with(params, layer_weights=(1.0,)), real=real, syn=syn, real_labels=yr, syn_labels=ys
        ),
        lambda: mi.mi_loss(
            mi.Heads(params.params[:1], params.config),
            real=real,
            syn=syn,
            real_labels=yr,
            syn_labels=ys,
        ),
        lambda: mi.positive_mask(real_labels=yr, syn_labels=ys, mode="cosine"),
        lambda: mi.negative_weights(pos, "nce", negatives="all"),
        lambda: mi.lda_projection(scores, jnp.arange(scores.shape[0]), shrinkage=0.0),
        lambda: mi.layer_mi(
            mi.Heads(({"bias": jnp.zeros(())},), mi.make_config(head="none")),
            0,
            real=real[0],
            syn=syn[0],
            real_labels=yr,
            syn_labels=ys,
            bank=mi.init_memory_bank(3, 2, 3),
        ),
    ]
    for call in calls:
        with pytest.raises(ConfigError):
            call()


def test_per_side_heads_are_separate_parameters():
    shapes = [(1, 4, 4, 6), (1, 2, 2, 8)]
    shared = mi.init_heads(jax.random.PRNGKey(0), shapes, embed_dim=5)
    sides = mi.init_heads(jax.random.PRNGKey(0), shapes, embed_dim=5, heads="per_side")
    for one, two in zip(shared.params, sides.params, strict=True):
        assert "proj_syn" not in one and set(two) == {"proj", "proj_syn", "bias"}
        # The real side's head is the shared one; the synthetic side's starts as its copy, in
        # buffers of its own (the step donates every leaf).
        jax.tree.map(np.testing.assert_array_equal, one["proj"], two["proj"])
        jax.tree.map(np.testing.assert_array_equal, two["proj"], two["proj_syn"])
        for a, b in zip(
            jax.tree.leaves(two["proj"]), jax.tree.leaves(two["proj_syn"]), strict=True
        ):
            assert a is not b and a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
    labels = jnp.arange(6) % 3
    real = [jax.random.normal(jax.random.PRNGKey(2), (6, *s[1:])) for s in shapes]
    syn = [jax.random.normal(jax.random.PRNGKey(3), (6, *s[1:])) for s in shapes]

    def loss(heads):
        return mi.mi_loss(heads, real=real, syn=syn, real_labels=labels, syn_labels=labels)[0]

    # Both heads learn, each from its own side (the real one through z_real, the synthetic one
    # through z_syn), so one update sends them apart; the shared head gets the sum of the two.
    grads, shared_grads = jax.grad(loss)(sides), jax.grad(loss)(shared)
    for g, gs in zip(grads.params, shared_grads.params, strict=True):
        k_real, k_syn = (g[side]["params"]["out"]["kernel"] for side in ("proj", "proj_syn"))
        assert min(float(jnp.max(jnp.abs(k))) for k in (k_real, k_syn)) > 0
        assert float(jnp.max(jnp.abs(k_real - k_syn))) > 0
        np.testing.assert_allclose(
            k_real + k_syn, gs["proj"]["params"]["out"]["kernel"], rtol=1e-4, atol=1e-6
        )
    moved = jax.tree.map(lambda p, g: p - 0.1 * g, sides, grads)
    z_real, z_syn = mi.embed(moved, 0, real=real[0], syn=real[0])
    assert z_real.shape == z_syn.shape == (6, 5) and float(jnp.max(jnp.abs(z_real - z_syn))) > 0
    z_real, z_syn = mi.embed(sides, 0, real=real[0], syn=real[0])
    np.testing.assert_allclose(z_real, z_syn, rtol=1e-6)  # equal heads at the start


def test_per_side_heads_need_trained_heads():
    with pytest.raises(
        ConfigError, match="unknown MI heads 'both'; valid choices: 'shared', 'per_side'"
    ):
        mi.make_config(heads="both")
    with pytest.raises(ConfigError, match="head 'lda' is refitted.*heads='shared'"):
        mi.make_config(head="lda", heads="per_side")
