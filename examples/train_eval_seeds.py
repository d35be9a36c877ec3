"""Train and evaluate a ConvNet on a synthetic set, vmapped over seeds (no config).

python examples/train_eval_seeds.py
"""

import jax
import jax.numpy as jnp
import optax

from mim4dd_jax import data, inner, models, state


def toy_dataset(classes: int = 10, per_class: int = 30, hw: int = 28) -> data.Dataset:
    """Gaussian images whose mean is the class index (stands in for data.load_dataset)."""
    y = jnp.repeat(jnp.arange(classes), per_class)
    x = jax.random.normal(jax.random.key(1), (len(y), hw, hw, 1)) + y[:, None, None, None] / 4
    ones = jnp.ones(1)
    return data.Dataset("toy", x, y, x, y, num_classes=classes, mean=0 * ones, std=ones, zca=None)


def main(seeds: int = 5, steps: int = 300, ipc: int = 10, width: int = 128, **toy) -> jax.Array:
    ds = toy_dataset(**toy)
    syn = state.init_images(jax.random.key(0), ds, ipc, init="real")  # {"images", "labels"}
    model = models.ConvNet(num_classes=ds.num_classes, width=width, depth=3)
    tx = optax.sgd(optax.cosine_decay_schedule(0.01, steps), momentum=0.9)  # any optax tx

    def train_and_test(key: jax.Array) -> jax.Array:
        init_key, data_key = jax.random.split(key)
        variables = inner.train(
            init_key, syn["images"], syn["labels"],
            model=model, tx=tx, steps=steps, batch_size=256, key=data_key,
        )  # fmt: skip
        return inner.accuracy(model, variables, ds.test_images, ds.test_labels)

    keys = jax.random.split(jax.random.key(2), seeds)
    return jax.jit(jax.vmap(train_and_test))(keys)  # one program for all seeds


if __name__ == "__main__":
    acc = main()
    print(f"accuracy: {100 * acc.mean():.2f} ± {100 * acc.std():.2f} % over {len(acc)} seeds")
    # The paper protocol instead: inner.train_classifier (SGD 0.01, momentum 0.9, wd 5e-4,
    # x0.1 after half the epochs, 300 epochs) via evaluate.evaluate.
