"""The standard DD evaluation protocol.

K fresh models are trained from scratch on the synthetic (or coreset) set and tested on the full real
test split; we report mean ± std of the test accuracy. Defaults follow the reference
(DatasetCondensation ``evaluate_synset``): SGD momentum 0.9, weight decay 5e-4, lr 0.01 (or the learned
lr), ×0.1 half-way, batch 256, 300 epochs without augmentation or 1000 with DSA. The K models of one
architecture train as one vmapped, jitted program; several architectures can be evaluated in one call.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim4dd_jax import artifacts, inner, models, sharding
from mim4dd_jax import augment as augment_lib


class EvalResult(NamedTuple):
    """Test accuracies (in [0, 1]) of the K models of one architecture."""

    model: str
    accuracies: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))

    def as_dict(self) -> dict[str, Any]:
        """{"mean", "std", "all"} for results.json and metrics.jsonl."""
        return {"mean": self.mean, "std": self.std, "all": self.accuracies.tolist()}

    def __str__(self) -> str:
        return f"{self.model}: {100 * self.mean:.2f} ± {100 * self.std:.2f} % ({len(self.accuracies)} models)"


@functools.cache
def dsa_augment_fn(strategy: str, dataset: str) -> inner.AugmentFn:
    """Per-sample DSA for training evaluation models (flip dropped for digit datasets).

    Cached: the same (strategy, dataset) gives the same function object, so the jitted
    training program (which takes it as a static argument) is compiled once, not at every
    evaluation of a run."""
    return functools.partial(
        augment_lib.augment,
        strategy=augment_lib.strategy_for_dataset(strategy, dataset),
        siamese=False,
    )


def evaluate(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    test_images: jax.Array,
    test_labels: jax.Array,
    *,
    architectures: Sequence[tuple[str, nn.Module]],
    num_models: int = 5,
    lr: float = 0.01,
    train_config: inner.TrainConfig = inner.TrainConfig(),
    augment: inner.AugmentFn | None = None,
    test_batch_size: int = 500,
    parallel: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    progress: bool | None = None,
    chunk_epochs: int = 0,
) -> list[EvalResult]:
    """Trains ``num_models`` fresh models per architecture on (images, labels) and tests them.

    Args:
      key: PRNG key; model i of architecture j uses ``fold_in(fold_in(key, j), i)``.
      images: [N, H, W, C] float32 in model space (normalised, whitened if ZCA is on).
      labels: [N] int32 or soft [N, K] float32.
      test_images, test_labels: the real test split, [M, H, W, C] and [M].
      parallel: ``vmap`` the K models, ``map`` them in sequence, or ``auto`` (per backend).
      architectures: (name, Flax module) pairs, e.g. from ``models.get_model``; several give a
        cross-architecture evaluation in one call.
      mesh: spread the models over these devices (``inner.train_and_test_many``); None or one
        device: all on the default device.
      progress: a progress bar per architecture on stderr (ETA, the models' mean training
        loss, the accuracy at the end); None: only when stderr is a terminal. With progress the
        K models train in chunks of epochs (``inner.train_and_test_chunked``), which gives the
        same accuracies bit for bit as the one program used without it.
      chunk_epochs: epochs per chunk (0: about 20 chunks with progress, one program without).
    """
    if progress is None:
        # Every process of a multi-process run must run the same programs: no tty-dependent
        # chunking there.
        progress = sys.stderr.isatty() and jax.process_count() == 1
    passes = train_config.epochs + 1
    if progress and not chunk_epochs:
        chunk_epochs = max(1, math.ceil(passes / PROGRESS_CHUNKS))
    if mesh is not None and sharding.size(mesh) == 1:
        mesh = None  # the single-device program, compiled (and cached) as without a mesh
    place = jnp.asarray
    if mesh is not None:
        # Global (replicated) inputs: what jit over a multi-host mesh requires.
        place = lambda x: sharding.put(np.asarray(x), sharding.replicated(mesh))
    results = []
    for j, (name, model) in enumerate(architectures):
        arch_key = jax.random.fold_in(key, j)
        keys = jax.vmap(lambda i, k=arch_key: jax.random.fold_in(k, i))(jnp.arange(num_models))
        args = (keys, place(images), place(labels), jnp.float32(lr))
        args += (place(test_images), place(test_labels))
        kwargs = dict(
            model=model,
            config=train_config,
            augment=augment,
            test_batch_size=test_batch_size,
            parallel=parallel,
            mesh=mesh,
        )
        if not chunk_epochs:
            accs = inner.train_and_test_many(*args, **kwargs)
            results.append(EvalResult(name, sharding.to_host(accs)))
            continue
        with artifacts.progress_bar(f"eval {name} x{num_models}", passes, enabled=progress) as bar:
            on_chunk = None
            if progress:

                def on_chunk(done: int, total: int, loss: jax.Array, bar: Any = bar) -> None:
                    bar.set_postfix_str(f"loss {float(np.mean(sharding.to_host(loss))):.4f}")
                    bar.update(done - bar.n)

            accs = inner.train_and_test_chunked(
                *args, **kwargs, chunk_epochs=chunk_epochs, on_chunk=on_chunk
            )
            result = EvalResult(name, sharding.to_host(accs))
            bar.set_postfix_str(f"acc {100 * result.mean:.2f} ± {100 * result.std:.2f} %")
        results.append(result)
    return results


# With progress, an evaluation trains in about this many chunks of epochs (one host round trip
# each, to read the loss for the bar).
PROGRESS_CHUNKS = 20


def evaluate_from_config(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    dataset: Any,
    config: Any,
    lr: float | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool | None = None,
) -> list[EvalResult]:
    """:func:`evaluate` driven by ``config.eval``/``config.model``/``config.dsa``, on ``mesh``
    (default: ``config.mesh``)."""
    ev = config.eval
    augment = dsa_augment_fn(config.dsa.strategy, dataset.name) if ev.dsa else None
    return evaluate(
        key,
        images,
        labels,
        dataset.test_images,
        dataset.test_labels,
        architectures=[(name, eval_model(config, dataset.num_classes, name)) for name in ev.models],
        num_models=ev.num_models,
        lr=ev.lr if lr is None else lr,
        train_config=inner.TrainConfig(
            epochs=ev.epochs,
            batch_size=ev.batch_size,
            momentum=ev.momentum,
            weight_decay=ev.weight_decay,
        ),
        augment=augment,
        test_batch_size=ev.test_batch_size,
        parallel=ev.parallel,
        mesh=sharding.mesh_from_config(config) if mesh is None else mesh,
        progress=progress,
    )


def eval_model(config: Any, num_classes: int, name: str | None = None) -> nn.Module:
    """``models.build_model`` for the evaluation's training. A ConvNet on CPU with conv_impl "auto"
    and the models run one after another (``eval.parallel`` map, CPU's default) uses the
    "hybrid" conv there: evaluation differentiates once and needs no input gradient of the first
    layer, and 5 ConvNet-3 evaluations took 0.82-0.91x the time of im2col at 100 images and
    0.90x at 10 (0.98x at 500; BENCHMARKS.md, issue 15). Vmapped over models, XLA's conv
    becomes a grouped conv that ran 2.4x slower, so ``vmap`` keeps im2col; other architectures
    are unmeasured and keep "auto" too."""
    model = models.build_model(config, num_classes, name)
    mapped = inner.resolve_parallel(config.eval.parallel) == "map"
    return (
        models.prefer_conv(model, config, "hybrid")
        if mapped and isinstance(model, models.ConvNet)
        else model
    )
