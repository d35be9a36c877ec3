"""Base DD objectives: gradient distance, DC, DM, the MTT student unroll and loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim4dd_jax import objectives as obj
from mim4dd_jax.augment import augment
from mim4dd_jax.errors import ConfigError
from mim4dd_jax.inner import cross_entropy, init_variables
from mim4dd_jax.models import get_model

C, N_REAL, IPC = 3, 4, 2
SHAPE = (8, 8, 3)
# Two cheap ops keep the per-call op choice (lax.switch) and the per-class keys under test; the
# augment tests cover the ops themselves.
DSA = "color_flip"
MODEL = get_model("convnet", num_classes=C, width=4, depth=1)


@functools.partial(jax.jit, static_argnums=0)
def _init(model, key):
    return init_variables(model, key, SHAPE)


@pytest.fixture(scope="module")
def variables():
    return _init(MODEL, jax.random.key(0))


@pytest.fixture(scope="module")
def batches():
    kr, ks = jax.random.split(jax.random.key(1))
    real = jax.random.normal(kr, (C, N_REAL, *SHAPE))
    syn = jax.random.normal(ks, (C, IPC, *SHAPE))
    return real, syn


def _tree(key):
    k = jax.random.split(key, 4)
    return {
        "conv": {
            "kernel": jax.random.normal(k[0], (3, 3, 2, 5)),
            "bias": jax.random.normal(k[1], (5,)),
        },
        "dense": {"kernel": jax.random.normal(k[2], (7, 3)), "bias": jax.random.normal(k[3], (3,))},
    }


# ---------------------------------------------------------------------------------------------
# gradient_distance
# ---------------------------------------------------------------------------------------------

gdist = jax.jit(obj.gradient_distance)


def test_gradient_distance_identical_is_zero():
    g = _tree(jax.random.key(2))
    assert abs(float(gdist(g, g))) < 1e-5


def test_gradient_distance_orthogonal_rows_count_rows():
    # Conv [1,1,2,3]: every output row of the real side is along e0, of the syn side along e1.
    real_conv = jnp.zeros((1, 1, 2, 3)).at[0, 0, 0, :].set(jnp.array([1.0, 2.0, 3.0]))
    syn_conv = jnp.zeros((1, 1, 2, 3)).at[0, 0, 1, :].set(jnp.array([4.0, 0.5, 1.0]))
    # Dense [in=2, out=4]: same idea, 4 rows.
    real_dense = jnp.zeros((2, 4)).at[0].set(1.0)
    syn_dense = jnp.zeros((2, 4)).at[1].set(-2.0)
    d = gdist({"a": real_conv, "b": real_dense}, {"a": syn_conv, "b": syn_dense})
    np.testing.assert_allclose(float(d), 3 + 4, rtol=1e-6)


def test_gradient_distance_invariant_to_positive_scaling():
    g, h = _tree(jax.random.key(3)), _tree(jax.random.key(4))
    scaled = jax.tree.map(lambda x: 3.7 * x, h)
    base = float(gdist(g, h))
    assert base > 1.0  # random rows are far from parallel
    np.testing.assert_allclose(float(gdist(g, scaled)), base, rtol=1e-5)
    np.testing.assert_allclose(float(gdist(scaled, g)), base, rtol=1e-5)


def test_gradient_distance_ignores_1d_leaves():
    g, h = _tree(jax.random.key(5)), _tree(jax.random.key(6))
    h2 = {
        "conv": {**h["conv"], "bias": -100.0 * h["conv"]["bias"]},
        "dense": {**h["dense"], "bias": jnp.zeros(3)},
    }
    np.testing.assert_allclose(float(gdist(g, h2)), float(gdist(g, h)), rtol=1e-6)
    only_1d = {"scale": jnp.ones(4), "bias": jnp.arange(4.0)}
    assert float(gdist(only_1d, jax.tree.map(lambda x: -x, only_1d))) == 0.0


def test_gradient_distance_hand_computed_dense():
    # Dense kernel [in, out]: rows are output columns. real columns (1,0), (0,1); syn columns
    # (1,1), (0,0): cos = 1/sqrt2 and (zero row) 0.
    real = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    syn = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    expected = (1 - 1 / (np.sqrt(2) + 1e-6)) + 1.0
    np.testing.assert_allclose(float(gdist({"k": real}, {"k": syn})), expected, rtol=1e-6)


def test_gradient_distance_matches_torch_layout_reference():
    g, h = _tree(jax.random.key(7)), _tree(jax.random.key(8))

    def ref(a, b):  # torch layouts: conv OIHW -> [O, I*H*W]; Linear [out, in]
        total = 0.0
        for ka, kb in (
            (a["conv"]["kernel"], b["conv"]["kernel"]),
            (a["dense"]["kernel"], b["dense"]["kernel"]),
        ):
            ka, kb = np.asarray(ka, np.float64), np.asarray(kb, np.float64)
            if ka.ndim == 4:
                ka, kb = ka.transpose(3, 2, 0, 1), kb.transpose(3, 2, 0, 1)
            else:
                ka, kb = ka.T, kb.T
            ra, rb = ka.reshape(ka.shape[0], -1), kb.reshape(kb.shape[0], -1)
            cos = (ra * rb).sum(-1) / (
                np.linalg.norm(ra, axis=-1) * np.linalg.norm(rb, axis=-1) + 1e-6
            )
            total += (1 - cos).sum()
        return total

    np.testing.assert_allclose(float(gdist(g, h)), ref(g, h), rtol=1e-5)


def test_gradient_distance_zero_row_has_finite_gradient():
    g = _tree(jax.random.key(9))
    h = jax.tree.map(jnp.zeros_like, g)
    grad = jax.jit(jax.grad(obj.gradient_distance, argnums=1))(g, h)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(grad))


# ---------------------------------------------------------------------------------------------
# DC / DSA
# ---------------------------------------------------------------------------------------------


@functools.cache
def _dc(dsa):
    """One compiled (loss, (d/d real, d/d syn)) per strategy, shared by the tests."""
    fn = functools.partial(obj.dc_loss, model=MODEL, dsa_strategy=dsa)
    return jax.jit(jax.value_and_grad(fn, argnums=(1, 2)))


def test_dc_loss_vmapped_equals_python_loop(variables, batches):
    real, syn = batches
    key = jax.random.key(10)
    params = variables["params"]
    got, _ = _dc(DSA)(params, real, syn, key)

    def ce(p, x, c):
        logits = MODEL.apply({"params": p}, x)
        return jnp.mean(cross_entropy(logits, jnp.full((x.shape[0],), c)))

    @jax.jit
    def loop(params, real, syn, key):
        keys = jax.random.split(key, C)
        total = 0.0
        for c in range(C):
            xr = augment(keys[c], real[c], strategy=DSA)
            xs = augment(keys[c], syn[c], strategy=DSA)
            gr, gs = jax.grad(ce)(params, xr, c), jax.grad(ce)(params, xs, c)
            total += obj.gradient_distance(gr, gs)
        return total

    np.testing.assert_allclose(float(got), float(loop(params, real, syn, key)), rtol=1e-5)


@pytest.mark.parametrize("groups", [1, C])  # C = 3: one group looping 3 classes; 3 groups of 1
def test_dc_loss_real_gradients_class_by_class_equal_vmapped(variables, batches, groups):
    real, syn = batches
    key, params = jax.random.key(12), variables["params"]
    want, (_, g_want) = _dc(DSA)(params, real, syn, key)
    fn = functools.partial(obj.dc_loss, model=MODEL, dsa_strategy=DSA, real_groups=groups)
    got, (g_real, g_got) = jax.jit(jax.value_and_grad(fn, argnums=(1, 2)))(params, real, syn, key)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-7)
    assert float(jnp.max(jnp.abs(g_real))) == 0.0


def test_dc_loss_gradient_reaches_syn_only(variables, batches):
    real, syn = batches
    _, (g_real, g_syn) = _dc(DSA)(variables["params"], real, syn, jax.random.key(11))
    assert bool(jnp.all(jnp.isfinite(g_syn)))
    assert float(jnp.max(jnp.abs(g_syn))) > 0
    assert float(jnp.max(jnp.abs(g_real))) == 0.0


@pytest.mark.parametrize("dsa", [None, DSA])
def test_dc_loss_zero_when_syn_equals_real(variables, batches, dsa):
    _, syn = batches
    # Each real class holds the synthetic images twice: the same mean gradient, and with DSA the
    # same per-class transform on both sides.
    real = jnp.concatenate([syn, syn], axis=1)
    fn = _dc(dsa)
    same, _ = fn(variables["params"], real, syn, jax.random.key(12))
    different, _ = fn(variables["params"], real, syn[:, :, ::-1], jax.random.key(12))
    assert abs(float(same)) < 1e-3
    assert float(different) > 0.1


def test_dc_loss_with_frozen_batch_norm_statistics(batches):
    real, syn = batches
    model = get_model("convnet", num_classes=C, width=4, depth=1, norm="batch")
    v = _init(model, jax.random.key(13))
    refreshed = jax.jit(functools.partial(obj.refresh_batch_stats, model=model))(
        v, real.reshape(-1, *SHAPE)
    )
    old, new = v["batch_stats"]["norm0"]["mean"], refreshed["batch_stats"]["norm0"]["mean"]
    assert float(jnp.max(jnp.abs(new - old))) > 0
    state = {"batch_stats": refreshed["batch_stats"]}
    fn = functools.partial(obj.dc_loss, model=model, dsa_strategy=None)
    loss, g = jax.jit(jax.value_and_grad(fn, argnums=2))(
        refreshed["params"], real, syn, jax.random.key(14), state=state
    )
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0


def test_dc_loops_follow_the_reference():
    assert obj.dc_loops(1) == (1, 1)
    assert obj.dc_loops(10) == (10, 50)
    assert obj.dc_loops(50) == (50, 10)
    with pytest.raises(ConfigError, match="7"):
        obj.dc_loops(7)


# ---------------------------------------------------------------------------------------------
# DM
# ---------------------------------------------------------------------------------------------


@functools.cache
def _dm(dsa):
    fn = functools.partial(obj.dm_loss, model=MODEL, dsa_strategy=dsa)
    return jax.jit(jax.value_and_grad(fn, argnums=(1, 2)))


def test_dm_loss_equals_per_class_loop(variables, batches):
    real, syn = batches
    key = jax.random.key(20)
    got, _ = _dm(DSA)(variables, real, syn, key)

    @jax.jit
    def loop(variables, real, syn, key):
        keys = jax.random.split(key, C)
        total = 0.0
        for c in range(C):
            embed = lambda x: MODEL.apply(variables, x, features=True).embedding
            er = embed(augment(keys[c], real[c], strategy=DSA))
            es = embed(augment(keys[c], syn[c], strategy=DSA))
            total += jnp.sum((er.mean(0) - es.mean(0)) ** 2)
        return total

    np.testing.assert_allclose(float(got), float(loop(variables, real, syn, key)), rtol=1e-5)


def test_dm_loss_zero_when_class_means_match(variables, batches):
    real, syn = batches
    # Each synthetic class holds its real images twice (in another order): identical means.
    matched = jnp.concatenate([real, real[:, ::-1]], axis=1)
    fn = jax.jit(functools.partial(obj.dm_loss, model=MODEL, dsa_strategy=None))
    assert float(fn(variables, real, matched, jax.random.key(21))) < 1e-9
    # (Not a rescaling: instance norm makes the net blind to the scale of its input.)
    unmatched = jnp.concatenate([real, real[:, ::-1, ::-1]], axis=1)
    assert float(fn(variables, real, unmatched, jax.random.key(21))) > 1e-3


def test_dm_loss_siamese_dsa_on_identical_batches_is_zero(variables, batches):
    _, syn = batches
    key = jax.random.key(22)
    # Real classes = the synthetic ones twice (different batch sizes, identical means).
    real = jnp.concatenate([syn, syn], axis=1)
    loss, _ = _dm(DSA)(variables, real, syn, key)
    assert float(loss) < 1e-9
    # Control: the losses are not trivially small (a vertical flip, which no DSA op applies).
    loss, _ = _dm(DSA)(variables, real, syn[:, :, ::-1], key)
    assert float(loss) > 1e-4


def test_dm_loss_gradient_reaches_syn_only(variables, batches):
    real, syn = batches
    _, (g_real, g_syn) = _dm(DSA)(variables, real, syn, jax.random.key(23))
    assert bool(jnp.all(jnp.isfinite(g_syn)))
    assert float(jnp.max(jnp.abs(g_syn))) > 0
    assert float(jnp.max(jnp.abs(g_real))) == 0.0


def test_dm_features_are_class_major_and_give_the_loss(variables, batches):
    real, syn = batches
    fn = jax.jit(functools.partial(obj.dm_loss_and_features, model=MODEL, dsa_strategy=None))
    loss, feats = fn(variables, real, syn, jax.random.key(24))
    assert feats.real.embedding.shape[0] == C * N_REAL
    assert feats.syn.embedding.shape[0] == C * IPC
    assert len(feats.syn.blocks) == 1 and feats.syn.blocks[0].shape[0] == C * IPC
    direct = MODEL.apply(variables, syn.reshape(-1, *SHAPE), features=True)
    np.testing.assert_allclose(feats.syn.embedding, direct.embedding, rtol=1e-5, atol=1e-6)
    mr = feats.real.embedding.reshape(C, N_REAL, -1).mean(1)
    ms = feats.syn.embedding.reshape(C, IPC, -1).mean(1)
    np.testing.assert_allclose(float(loss), float(jnp.sum((mr - ms) ** 2)), rtol=1e-5)
    np.testing.assert_array_equal(obj.class_labels(C, IPC), [0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize("chunk", [3, 6, 9, 100])  # m = 1 (n/m = 4), 2, 3 (padded), one pass
def test_features_in_slices_equal_one_pass(variables, batches, chunk):
    real, _ = batches
    sliced = jax.jit(obj.features_in_slices, static_argnums=(0, 3))(MODEL, variables, real, chunk)
    whole = MODEL.apply(variables, real.reshape(-1, *SHAPE), features=True)
    for got, want in zip(jax.tree.leaves(sliced), jax.tree.leaves(whole), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_dm_loss_with_real_chunks_equals_one_pass(variables, batches):
    real, syn = batches
    key = jax.random.key(25)
    one, g_one = _dm(DSA)(variables, real, syn, key)
    fn = functools.partial(obj.dm_loss, model=MODEL, dsa_strategy=DSA, real_chunk=C * 3)
    sliced, g_sliced = jax.jit(jax.value_and_grad(fn, argnums=(1, 2)))(variables, real, syn, key)
    np.testing.assert_allclose(float(sliced), float(one), rtol=1e-5)
    np.testing.assert_allclose(g_sliced[1], g_one[1], rtol=1e-4, atol=1e-7)
    assert float(jnp.max(jnp.abs(g_sliced[0]))) == 0.0


def test_features_in_slices_keeps_one_pass_for_batchnorm():
    model = get_model("convnet", num_classes=C, width=4, depth=1, norm="batch")
    variables = init_variables(model, jax.random.key(0), SHAPE)
    real = jax.random.normal(jax.random.key(1), (C, N_REAL, *SHAPE))
    got = obj.features_in_slices(model, variables, real, C)
    want = obj._features(model, variables, real.reshape(-1, *SHAPE))
    np.testing.assert_array_equal(got.embedding, want.embedding)


# ---------------------------------------------------------------------------------------------
# MTT
# ---------------------------------------------------------------------------------------------

N_SYN = C * IPC


@pytest.fixture(scope="module")
def mtt_setup(variables):
    kx, kt = jax.random.split(jax.random.key(30))
    syn_x = jax.random.normal(kx, (N_SYN, *SHAPE))
    syn_y = obj.class_labels(C, IPC)
    start = variables["params"]
    target = _init(MODEL, kt)["params"]
    return syn_x, syn_y, start, target


@jax.jit
def _sgd_step(p, x, y, lr):
    g = jax.grad(lambda p: jnp.mean(cross_entropy(MODEL.apply({"params": p}, x), y)))(p)
    return jax.tree.map(lambda a, b: a - lr * b, p, g)


@functools.cache
def _unroll(syn_steps, batch_syn=None):
    return jax.jit(
        functools.partial(obj.student_unroll, model=MODEL, syn_steps=syn_steps, batch_syn=batch_syn)
    )


def test_one_student_step_is_one_sgd_step(mtt_setup):
    syn_x, syn_y, start, _ = mtt_setup
    lr = 0.05
    expected = _sgd_step(start, syn_x, syn_y, lr)
    # Hard labels [N] and the equivalent soft labels [N, K] give the same step.
    for labels in (syn_y, jax.nn.one_hot(syn_y, C)):
        got = _unroll(1)(start, syn_x, labels, lr, jax.random.key(31))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_scan_unroll_equals_python_loop(mtt_setup):
    syn_x, syn_y, start, _ = mtt_setup
    lr, steps, batch = 0.1, 3, 4  # 6 images in chunks of 4: every other chunk is padded
    key = jax.random.key(32)
    got = _unroll(steps, batch)(start, syn_x, syn_y, lr, key)
    idx, mask = obj.minibatch_schedule(
        jax.random.split(key)[0], N_SYN, syn_steps=steps, batch_syn=batch
    )
    params = start
    for s in range(steps):
        ix = np.asarray(idx[s])[np.asarray(mask[s]) > 0]
        params = _sgd_step(params, syn_x[ix], syn_y[ix], lr)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_minibatch_schedule_cycles_through_permutations():
    idx, mask = obj.minibatch_schedule(jax.random.key(33), 6, syn_steps=5, batch_syn=4)
    assert idx.shape == (5, 4) and mask.shape == (5, 4)
    np.testing.assert_array_equal(np.asarray(mask).sum(1), [4, 2, 4, 2, 4])
    for cycle in (0, 1):
        rows = np.asarray(idx[2 * cycle : 2 * cycle + 2]).ravel()[np.asarray(mask[:2]).ravel() > 0]
        np.testing.assert_array_equal(np.sort(rows), np.arange(6))
    with pytest.raises(ConfigError, match="syn_steps"):
        obj.minibatch_schedule(jax.random.key(0), 6, syn_steps=0, batch_syn=4)


def _mtt_objective(remat):
    def f(syn_x, log_lr, syn_y, start, target, key):
        final = obj.student_unroll(
            start,
            syn_x,
            syn_y,
            jnp.exp(log_lr),
            key,
            model=MODEL,
            syn_steps=4,
            batch_syn=3,
            dsa_strategy=DSA,
            remat=remat,
        )
        return obj.mtt_loss(final, start, target)

    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def test_remat_gives_same_loss_and_gradients(mtt_setup):
    syn_x, syn_y, start, target = mtt_setup
    args = (syn_x, jnp.log(0.1), syn_y, start, target, jax.random.key(34))
    (l0, (gx0, glr0)) = _mtt_objective(False)(*args)
    (l1, (gx1, glr1)) = _mtt_objective(True)(*args)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    np.testing.assert_allclose(gx1, gx0, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(float(glr1), float(glr0), rtol=1e-5, atol=1e-8)
    assert np.isfinite(float(glr0)) and float(glr0) != 0.0
    assert bool(jnp.all(jnp.isfinite(gx0))) and float(jnp.max(jnp.abs(gx0))) > 0


def test_mtt_loss_endpoints(mtt_setup):
    syn_x, syn_y, start, target = mtt_setup
    loss = jax.jit(obj.mtt_loss)
    assert float(loss(target, start, target)) == 0.0
    np.testing.assert_allclose(float(loss(start, start, target)), 1.0, rtol=1e-6)
    halfway = jax.tree.map(lambda a, b: 0.5 * (a + b), start, target)
    np.testing.assert_allclose(float(loss(halfway, start, target)), 0.25, rtol=1e-5)
    # A student with lr 0 stays at the start.
    stayed = _unroll(1)(start, syn_x, syn_y, 0.0, jax.random.key(35))
    np.testing.assert_allclose(float(loss(stayed, start, target)), 1.0, rtol=1e-6)


def test_unknown_dsa_op_is_a_config_error(variables, batches):
    real, syn = batches
    with pytest.raises(ConfigError, match="zoom"):
        obj.dm_loss(variables, real, syn, jax.random.key(0), model=MODEL, dsa_strategy="zoom")
