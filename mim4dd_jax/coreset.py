"""Coreset baselines: random real images per class, and herding.

These are the "Random" and "Herding" rows of every DD table. Herding (Welling, 2009) greedily picks,
per class, the example that keeps the running mean of the selected features closest to the class mean
feature. Its greedy choices are nested: the IPC-k selection is the first k of the IPC-k' one (k < k').
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from mim4dd_jax import artifacts, inner, models, runner
from mim4dd_jax import config as config_lib
from mim4dd_jax import data as data_lib
from mim4dd_jax import evaluate as evaluate_lib
from mim4dd_jax.choices import FEATURE_SPACES
from mim4dd_jax.errors import check_choice


def random_indices(key: jax.Array, index: data_lib.ClassIndex, ipc: int) -> jax.Array:
    """``ipc`` distinct random example indices per class: [C, ipc] int32."""
    return data_lib.sample_per_class(key, index, ipc)


@functools.partial(jax.jit, static_argnames=("ipc",))
def herding_select(features: jax.Array, count: jax.Array, ipc: int) -> jax.Array:
    """Greedy herding inside one class.

    Args:
      features: [M, D] features of the class's examples; rows >= ``count`` are padding.
      count: number of valid rows (scalar int).
      ipc: how many to select.
    Returns:
      [ipc] int32 row indices, in selection order.
    """
    chex.assert_rank(features, 2)
    valid = jnp.arange(features.shape[0]) < count
    mu = jnp.sum(jnp.where(valid[:, None], features, 0.0), axis=0) / count

    def pick(t, carry):
        total, taken, out = carry
        # Distance of the running mean after adding each candidate, to the class mean.
        dist = jnp.sum(((total + features) / (t + 1) - mu) ** 2, axis=1)
        dist = jnp.where(valid & ~taken, dist, jnp.inf)
        i = jnp.argmin(dist)
        return total + features[i], taken.at[i].set(True), out.at[t].set(i)

    init = (jnp.zeros_like(mu), jnp.zeros(features.shape[0], bool), jnp.zeros(ipc, jnp.int32))
    return jax.lax.fori_loop(0, ipc, pick, init)[2]


def herding_indices(features: np.ndarray, index: data_lib.ClassIndex, ipc: int) -> np.ndarray:
    """Herding per class on [N, D] features: returns [C, ipc] example indices."""
    rows = []
    num_classes = index.indices.shape[0]
    for c in artifacts.progress_iter(range(num_classes), "herding", num_classes, unit="class"):
        members = np.asarray(index.indices[c, : int(index.counts[c])])
        chosen = herding_select(jnp.asarray(features[members]), len(members), ipc)
        rows.append(members[np.asarray(chosen)])
    return np.stack(rows)


def embed(model: Any, variables: Any, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Penultimate embeddings [N, D] of images [N, H, W, C], computed in batches."""

    @jax.jit
    def f(x):
        return model.apply(variables, x, train=False, features=True).embedding

    out = []
    with artifacts.progress_bar("features", len(images), unit="image") as bar:
        for i in range(0, len(images), batch_size):
            out.append(np.asarray(f(jnp.asarray(images[i : i + batch_size]))))
            bar.update(len(out[-1]))
    return np.concatenate(out)


def herding_features(key: jax.Array, dataset: data_lib.Dataset, config: Any) -> np.ndarray:
    """Features [N, D] in which herding matches class means, per ``config.coreset.features``.

    ``pixels``: flattened images; ``random_net``: the embedding of a randomly initialised network;
    ``trained_net``: the embedding of a network trained on the full train split for
    ``coreset.feature_epochs`` (with the evaluation optimiser), as in the DC paper's herding baseline.
    """
    space = config.coreset.features
    check_choice("coreset.features", space, FEATURE_SPACES)
    x = dataset.train_images
    if space == "pixels":
        return x.reshape(len(x), -1)
    model = models.build_model(config, dataset.num_classes)
    if space == "random_net":
        variables = inner.init_variables(model, key, dataset.image_shape)
    else:
        train_config = inner.TrainConfig(
            epochs=config.coreset.feature_epochs,
            batch_size=config.eval.batch_size,
            momentum=config.eval.momentum,
            weight_decay=config.eval.weight_decay,
        )
        train = jax.jit(functools.partial(inner.train_classifier, model=model, config=train_config))
        desc = f"features net: {train_config.epochs} epochs"
        with artifacts.progress_bar(desc, 1, unit="net") as bar:
            variables = train(
                key, jnp.asarray(x), jnp.asarray(dataset.train_labels), config.eval.lr
            )
            jax.block_until_ready(variables)
            bar.update(1)
    return embed(model, variables, x)


def select(key: jax.Array, dataset: data_lib.Dataset, config: Any) -> np.ndarray:
    """Coreset example indices [C, ipc] for ``config.method`` in {random, herding}."""
    index = data_lib.class_index(dataset.train_labels, dataset.num_classes)
    config_lib.check_ipc(config.ipc, int(np.min(np.asarray(index.counts))))
    if config.method == "random":
        return np.asarray(random_indices(key, index, config.ipc))
    return herding_indices(herding_features(key, dataset, config), index, config.ipc)


@runner.holds_workdir
def run(config: Any, workdir: str) -> dict[str, Any]:
    """Selects a coreset, evaluates it, and writes ``distilled.npz``, ``grid.png``, results."""
    workdir, dataset, _ = runner.start(
        config,
        workdir,
        "coreset",
        lambda dataset, _: config_lib.check_ipc(config.ipc, data_lib.smallest_class(dataset)),
    )
    key = jax.random.key(config.seed)
    select_key, eval_key = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    chosen = select(select_key, dataset, config).reshape(-1)
    images = dataset.train_images[chosen]
    labels = dataset.train_labels[chosen]
    pixels = dataset.to_pixels(images)
    artifacts.save_synthetic_set(
        workdir,
        pixels,
        labels,
        dataset.num_classes,
        lr=config.eval.lr,
        config=config.to_dict(),
        indices=chosen,
    )
    logging.info(
        "selected %d images (%s, ipc %d); evaluating", len(chosen), config.method, config.ipc
    )
    results = evaluate_lib.evaluate_from_config(eval_key, images, labels, dataset, config)
    summary = {
        "method": config.method,
        "ipc": config.ipc,
        "dataset": dataset.name,
        "accuracy": {r.model: r.as_dict() for r in results},
    }
    runner.finish(workdir, summary)
    for r in results:
        print(f"{config.method} ipc{config.ipc} {r}")
    return summary
