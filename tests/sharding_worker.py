"""One distillation step per method on whatever devices this process has (used by
test_sharding.py: in the test process with one CPU device, and as a script in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` set before jax is imported).

    python tests/sharding_worker.py OUT.npz    # writes "<case>/<name>" arrays, see CASES

The image lr is large (1e4) so that the update ``old - new = lr * grad`` dominates the rounding
of ``new``: ``(old - new) / lr`` is the image gradient to ~1e-7 relative.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LR = 1e4
# Tiny fake data (helpers.fake_dataset: C classes of 8x8x1, 12 each), ipc 2, the helpers'
# TINY model and real batch (5 per class). On 4 devices, DM with 4 classes puts one class per
# device (with the MI term on, whose heads see features of every class shard); DC with 3
# classes takes the padded path (one device idle); MTT runs 4 (expert, start) pairs, one per
# device. DSA is off (a third of the compile time; test_sharding's run.py keeps it on).
# name: (config argument, number of classes, overrides).
NO_DSA = {"distill.lr": LR, "distill.dsa": False}
CASES = {
    # real_chunk 8: the real side in 3 slices of 2 per class (5 padded to 6), cut inside the
    # class shards.
    "dm": ("dm,ipc2", 4, {**NO_DSA, "mi.weight": 0.5, "distill.real_chunk": 8}),
    "dc": ("dc,ipc2", 3, {**NO_DSA, "distill.outer_loop": 1}),
    "mtt": (
        "mtt,ipc2",
        4,
        {
            **NO_DSA,
            "mtt.syn_steps": 3,
            "mtt.expert_epochs": 1,
            "mtt.max_start_epoch": 2,
            "mtt.batch_syn": 4,
            "mtt.num_trajectories": 4,
            "mtt.remat": "off",  # compiles in half the time; remat is tested in test_steps_mtt
        },
    ),
}


def fake_trajectories(config, dataset, experts: int = 2, epochs: int = 3):
    """[experts, epochs + 1, P] float32: a random walk from a fresh init (no training needed;
    the step only reads rows). The same numbers in every process."""
    import jax
    import numpy as np
    from jax.flatten_util import ravel_pytree

    from mim4dd_jax import inner, models

    model = models.build_model(config, dataset.num_classes)
    variables = inner.init_variables(model, jax.random.key(1), dataset.image_shape)
    p0 = np.asarray(ravel_pytree(variables["params"])[0])
    walk = np.random.default_rng(0).normal(0, 0.01, (experts, epochs + 1, p0.size))
    return (p0 + np.cumsum(walk, axis=1)).astype(np.float32)


def run_case(name: str) -> dict:
    """One step of CASES[name] from ``init_state(fold_in(key(0), 0))`` with key fold_in(key, 100),
    on all devices of this process (placed as distill.run places them). Returns host arrays:
    loss, base_loss, mi (when on), grad = (old - new images) / lr, images, syn_lr."""
    import jax
    import numpy as np
    from helpers import fake_dataset, tiny_config

    from mim4dd_jax import data, sharding
    from mim4dd_jax import state as state_lib
    from mim4dd_jax import steps as steps_lib

    arg, num_classes, overrides = CASES[name]
    config = tiny_config(arg, **overrides)
    dataset = fake_dataset(num_classes, 12, 8)
    mesh = sharding.mesh_from_config(config)
    key = jax.random.key(0)
    state = state_lib.init_state(jax.random.fold_in(key, 0), dataset, config)
    old = np.array(state["images"], copy=True)
    state = state_lib.place_state(state, mesh, config)
    everywhere = sharding.replicated(mesh)
    real = sharding.put(np.asarray(dataset.train_images), everywhere)
    experts = None
    if config.method == "mtt":
        experts = sharding.put(fake_trajectories(config, dataset), everywhere)
    index = data.class_index(dataset.train_labels, dataset.num_classes)
    step = steps_lib.make_step(config, dataset)
    new, metrics = step(state, jax.random.fold_in(key, 100), real, index, experts)
    images = np.asarray(new["images"])
    out = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
    out.update(
        images=images,
        grad=(old.astype(np.float64) - images) / LR,
        syn_lr=np.asarray(new["syn_lr"]),
        devices=np.int64(jax.device_count()),
        image_sharding=np.asarray(str(new["images"].sharding)),
    )
    return out


def plan_error() -> str:
    """The ConfigError of mesh.shard_synthetic with 3 * 2 synthetic images on this mesh."""
    from helpers import tiny_config

    from mim4dd_jax import sharding
    from mim4dd_jax import state as state_lib
    from mim4dd_jax.errors import ConfigError

    config = tiny_config("dm,ipc2", **{"mesh.shard_synthetic": True})
    try:
        state_lib.check_plan(config, 3, sharding.mesh_from_config(config))
    except ConfigError as e:
        return str(e)
    return ""


def main(path: str) -> None:
    import numpy as np

    arrays = {"plan_error": np.asarray(plan_error())}
    for name in CASES:
        for k, v in run_case(name).items():
            arrays[f"{name}/{k}"] = v
    np.savez(path, **arrays)


if __name__ == "__main__":
    main(sys.argv[1])
