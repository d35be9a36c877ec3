"""The evaluation protocol the reproduction rests on (issue 12): a padded last minibatch trains
like the reference's shorter one, ``eval.dsa`` really trains with DSA, an MTT run is evaluated
with its learned lr, and each method's published defaults are pinned in the config files."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, fake_dataset, tiny_config
from jax.flatten_util import ravel_pytree

from mim4dd_jax import augment, evaluate, inner, models
from mim4dd_jax import state as state_lib

C, PER_CLASS, HW = 3, 12, 8


# ----------------------------------------------------------------------------------------------
# A padded last minibatch = the reference's shorter last batch.
# ----------------------------------------------------------------------------------------------


def shorter_batches_by_hand(key, variables, x, y, *, model, passes, bs, lr, momentum, wd):
    """torch SGD(momentum, weight_decay) over the epochs of ``inner.sgd_epochs``'s shuffling,
    the last batch of each epoch as long as it really is (DataLoader drop_last=False)."""
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}
    buf = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def one(params, state, buf, xb, yb):
        def loss(p):
            logits, new = inner.apply_train(model, {**state, "params": p}, xb)
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(logp[jnp.arange(len(yb)), yb]), new

        g, new = jax.grad(loss, has_aux=True)(params)
        g = jax.tree.map(lambda g, p: g + wd * p, g, params)
        buf = jax.tree.map(lambda b, g: momentum * b + g, buf, g)
        params = jax.tree.map(lambda p, b: p - lr * b, params, buf)
        return params, {k: v for k, v in new.items() if k != "params"}, buf

    n = len(x)
    for e in range(passes):
        # The epoch's shuffle: its first n (padded) batch entries.
        idx, _ = inner._epoch_batches(jax.random.fold_in(jax.random.fold_in(key, e), 0), n, bs)
        order = np.asarray(idx).ravel()[:n]
        assert sorted(order.tolist()) == list(range(n))
        for lo in range(0, n, bs):
            b = order[lo : lo + bs]
            params, state, buf = one(params, state, buf, x[b], y[b])
    return {**state, "params": params}


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_padded_last_minibatch_trains_like_the_shorter_batch(norm):
    # 6 images in batches of 4: per epoch a full batch and one of 2 padded to 4.
    model = models.get_model("convnet", num_classes=C, width=8, depth=1, norm=norm, conv_impl="xla")
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (6, HW, HW, 1))
    y = jnp.asarray([0, 0, 1, 1, 2, 2], jnp.int32)
    variables = inner.init_variables(model, k2, (HW, HW, 1))
    key = jax.random.key(3)
    hp = dict(passes=2, bs=4, lr=0.1, momentum=0.9, wd=5e-4)
    got = inner.sgd_epochs(
        key,
        variables,
        x,
        y,
        hp["lr"],
        model=model,
        passes=hp["passes"],
        batch_size=hp["bs"],
        momentum=hp["momentum"],
        weight_decay=hp["wd"],
    )
    want = shorter_batches_by_hand(key, variables, x, y, model=model, **hp)
    flat = lambda tree: np.asarray(ravel_pytree(tree)[0])
    assert np.max(np.abs(flat(got["params"]) - flat(variables["params"]))) > 1e-2  # it trained
    # Parameters and (for BatchNorm) the running statistics.
    np.testing.assert_allclose(flat(got), flat(want), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# eval.dsa: the evaluation models train with DSA.
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset():
    """The fake train split; 300 random test images, so that two differently trained models
    all but surely differ in accuracy."""
    ds = fake_dataset(C, PER_CLASS, HW)
    k1, k2 = jax.random.split(jax.random.key(9))
    test_x = np.asarray(jax.random.normal(k1, (300, HW, HW, 1)) * 2 + 1, np.float32)
    test_y = np.asarray(jax.random.randint(k2, (300,), 0, C), np.int32)
    return ds._replace(test_images=test_x, test_labels=test_y)


def eval_config(**overrides):
    small = {
        "model.depth": 1,
        "conv_impl": "xla",  # the same math, compiles faster
        "eval.epochs": 2,
        "eval.num_models": 2,
        "eval.batch_size": 4,
        "dsa.strategy": "crop_flip",
    }
    return tiny_config("dm,ipc2", **{**small, **overrides})


def syn_set(dataset):
    """Two train images per class, class-major."""
    pick = np.concatenate([np.flatnonzero(dataset.train_labels == c)[:2] for c in range(C)])
    return dataset.train_images[pick], dataset.train_labels[pick]


def accuracies(dataset, config):
    images, labels = syn_set(dataset)
    results = evaluate.evaluate_from_config(jax.random.key(5), images, labels, dataset, config)
    return results[0].accuracies


class Linear(nn.Module):
    """A fake classifier (one Dense on the flattened image): cheap to compile."""

    num_classes: int

    @nn.compact
    def __call__(self, x, train=False, features=False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_eval_dsa_trains_the_models_with_dsa(dataset, monkeypatch):
    monkeypatch.setattr(models, "build_model", lambda config, num_classes, name=None: Linear(C))
    plain = accuracies(dataset, eval_config(**{"eval.dsa": False}))
    with_dsa = accuracies(dataset, eval_config(**{"eval.dsa": True}))
    assert not np.array_equal(with_dsa, plain), (with_dsa, plain)
    # eval.dsa with an identity augmentation is exactly the run without: the augmentation
    # draws its own keys, so only the transform itself differs between the two runs above.
    calls = []

    def identity_fn(strategy, dataset_name):
        calls.append((strategy, dataset_name))
        return lambda key, x: x

    monkeypatch.setattr(evaluate, "dsa_augment_fn", identity_fn)
    same = accuracies(dataset, eval_config(**{"eval.dsa": True}))
    np.testing.assert_array_equal(same, plain)
    assert calls == [("crop_flip", "fake")]


def test_eval_dsa_passes_the_per_sample_dsa_of_the_config(dataset, monkeypatch):
    seen = []

    def spy(keys, images, labels, lr, test_images, test_labels, **kwargs):
        seen.append(kwargs["augment"])
        return jnp.zeros(keys.shape[0])

    monkeypatch.setattr(inner, "train_and_test_many", spy)
    accuracies(dataset, eval_config(**{"eval.dsa": False}))
    accuracies(dataset, eval_config(**{"eval.dsa": True, "dsa.strategy": "crop"}))
    # No flip for digits: "flip" alone leaves MNIST's evaluation unaugmented.
    accuracies(
        dataset._replace(name="mnist"), eval_config(**{"eval.dsa": True, "dsa.strategy": "flip"})
    )
    assert seen[0] is None
    x = jnp.asarray(syn_set(dataset)[0])
    key = jax.random.key(11)
    expected = augment.augment(key, x, strategy="crop", siamese=False)
    np.testing.assert_array_equal(seen[1](key, x), expected)
    assert np.max(np.abs(np.asarray(expected) - np.asarray(x))) > 0
    np.testing.assert_array_equal(seen[2](key, x), x)
    assert np.max(np.abs(augment.augment(key, x, strategy="flip", siamese=False) - x)) > 0


def test_repeated_dsa_evaluations_compile_once(dataset, monkeypatch):
    # run() evaluates every distill.eval_every iterations: with eval.dsa each call must hit the
    # jit cache, not compile the whole training program again.
    monkeypatch.setattr(models, "build_model", lambda config, num_classes, name=None: Linear(C))
    config = eval_config(**{"eval.dsa": True, "eval.num_models": 1, "eval.epochs": 0})
    accuracies(dataset, config)
    before = inner.train_and_test_many._cache_size()
    accuracies(dataset, config)
    assert inner.train_and_test_many._cache_size() == before


# ----------------------------------------------------------------------------------------------
# The learned MTT lr is the evaluation lr.
# ----------------------------------------------------------------------------------------------


def capture_lrs(monkeypatch):
    """Replaces the evaluation's training with a spy; returns the list of lrs it is called with."""
    lrs = []

    def spy(keys, images, labels, lr, *args, **kwargs):
        lrs.append(float(lr))
        return jnp.zeros(keys.shape[0])

    monkeypatch.setattr(inner, "train_and_test_many", spy)
    return lrs


def test_evaluate_from_config_uses_the_lr_it_is_given(dataset, monkeypatch):
    lrs = capture_lrs(monkeypatch)
    config = eval_config(**{"eval.lr": 0.02})
    images, labels = syn_set(dataset)
    evaluate.evaluate_from_config(jax.random.key(0), images, labels, dataset, config)
    evaluate.evaluate_from_config(jax.random.key(0), images, labels, dataset, config, lr=0.037)
    np.testing.assert_allclose(lrs, [0.02, 0.037], rtol=1e-6)


def test_an_mtt_state_is_evaluated_with_its_own_lr_and_the_others_with_eval_lr():
    """distill.run evaluates with state_lib.student_lr(state); after MTT steps that is the learned
    lr (tests/test_distill_resume.py checks the lr a real MTT run evaluates with)."""
    dataset = fake_dataset(C, PER_CLASS, HW)
    lrs = {"mtt.lr_teacher": 0.02, "eval.lr": 0.01}
    mtt = tiny_config("mtt,ipc1", **lrs)
    state = state_lib.init_state(jax.random.key(0), dataset, mtt)
    assert mtt.mtt.learn_lr
    np.testing.assert_allclose(state_lib.student_lr(state, mtt), 0.02, rtol=1e-6)
    for method in ("dm", "dc", "dsa"):
        config = tiny_config(f"{method},ipc1", **lrs)
        assert (
            state_lib.student_lr(state_lib.init_state(jax.random.key(0), dataset, config), config)
            == 0.01
        )


# ----------------------------------------------------------------------------------------------
# Each method's published defaults (DESIGN.md, faithfulness notes).
# ----------------------------------------------------------------------------------------------


def fashion_mnist_config(arg):
    spec = importlib.util.spec_from_file_location(
        "fashion_mnist_config", os.path.join(ROOT, "configs", "fashion_mnist.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# method: eval.epochs, eval.dsa, distill.init, distill.lr, distill.momentum,
# distill.iterations, distill.batch_real, distill.dsa (siamese DSA while matching). None: not a
# method default (MTT's image lr is a per-dataset row of its table; our Fashion-MNIST row is a
# fallback, config.mtt_fallback_hparams).
PUBLISHED = {
    "dm": (1000, True, "real", 1.0, 0.5, 20000, 256, True),
    "dc": (300, False, "noise", 0.1, 0.5, 1000, 256, False),
    "dsa": (1000, True, "real", 0.1, 0.5, 1000, 256, True),
    "mtt": (1000, True, "real", None, 0.5, 5000, 256, True),
}
FIELDS = (
    "eval.epochs",
    "eval.dsa",
    "distill.init",
    "distill.lr",
    "distill.momentum",
    "distill.iterations",
    "distill.batch_real",
    "distill.dsa",
)


@pytest.mark.parametrize("ipc", [1, 10])
@pytest.mark.parametrize("method", sorted(PUBLISHED))
def test_fashion_mnist_method_defaults_are_the_published_protocol(method, ipc):
    c = fashion_mnist_config(f"{method},ipc{ipc}")
    pinned = {f: v for f, v in zip(FIELDS, PUBLISHED[method], strict=True) if v is not None}
    got = {f: c[f.split(".")[0]][f.split(".")[1]] for f in pinned}
    assert got == pinned
    # The evaluation protocol shared by all methods: 5 ConvNet-3 models, SGD momentum 0.9,
    # weight decay 5e-4, lr 0.01 (MTT: its learned lr), batch 256, the full DSA strategy.
    ev = c.eval
    assert (ev.num_models, ev.momentum, ev.weight_decay, ev.lr, ev.batch_size) == (
        5,
        0.9,
        5e-4,
        0.01,
        256,
    )
    assert tuple(ev.models) == ("convnet",) and (c.model.width, c.model.depth) == (128, 3)
    assert c.dsa.strategy == "color_crop_cutout_flip_scale_rotate"
    if method in ("dc", "dsa"):
        # The network's lr between image updates; outer/inner loops from objectives.dc_loops.
        assert (c.distill.lr_net, c.distill.outer_loop, c.distill.inner_loop) == (0.01, 0, 0)
    if method == "mtt":
        assert c.mtt.learn_lr  # evaluated with the learned lr (see above)
