"""Helpers shared by the benchmark scripts: machine description and BENCHMARKS.md appends."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

import numpy as np

from mim4dd_jax import artifacts, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def machine() -> str:
    """The machine line of a BENCHMARKS.md header, formatted from ``artifacts.machine()`` (what
    results.json records), so both name a machine the same way: the devices and backend off
    CPU, else the CPU model and core count."""
    m = artifacts.machine()
    if m["backend"] != "cpu":
        return f"{m['devices']} ({m['backend']})"
    return f"{m['cpu']}, {m['cores']} cores"


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def append_section(title: str, body: str) -> None:
    """Appends a dated section with the command and machine to BENCHMARKS.md."""
    today = datetime.date.today().isoformat()
    append_lines(
        f"\n## {title}\n\n- date: {today}\n- machine: {machine()}\n- command: `{command()}`\n\n"
        f"{body.rstrip()}"
    )


def append_lines(text: str) -> None:
    """Appends text (plus a newline) to BENCHMARKS.md at once, so partial runs keep their rows."""
    with open(BENCHMARKS_MD, "a") as f:
        f.write(text + "\n")
    print(text, flush=True)


def run_child(
    script: str, args: list[str], *, timeout: float | None = None, env: dict | None = None
) -> dict | str:
    """Runs ``python script *args`` in a fresh process from the repo root (so its peak RSS and
    XLA flags are its own) and returns the JSON object on the last line of its stdout, or a
    one-line reason it gave none. env: the child's environment (default: this one);
    JAX_PLATFORMS defaults to cpu and TF_CPP_MIN_LOG_LEVEL to 3 where it does not set them."""
    env = dict(os.environ if env is None else env)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cmd = [sys.executable, os.path.abspath(script), *args]
    try:
        out = subprocess.run(
            cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        killed = " (killed: out of memory?)" if out.returncode in (-9, 137) else ""
        return f"failed (rc {out.returncode}){killed}: {last[:120]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def fake_trajectories(config, num_classes: int, shape: tuple[int, ...]) -> np.ndarray:
    """[2, T+1, P] float32 random-walk "expert trajectories" long enough for ``config.mtt``, for
    timing MTT steps without training experts (the step's cost does not depend on the values)."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from mim4dd_jax import distill, inner

    model = models.build_model(config, num_classes)
    p0, _ = ravel_pytree(inner.init_variables(model, jax.random.key(1), shape)["params"])
    epochs = distill.min_expert_epochs(config) + 1
    walk = 0.01 * jax.random.normal(jax.random.key(2), (2, epochs, p0.size)) / np.sqrt(p0.size)
    return np.asarray(p0[None, None] + jnp.cumsum(walk, axis=1))


def random_dataset(name: str, num_classes: int, per_class: int, shape: tuple[int, ...]):
    """A ``data.Dataset`` of standard-normal images (for timing: costs do not depend on values)."""
    import jax

    from mim4dd_jax import data

    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    images = np.asarray(jax.random.normal(jax.random.key(42), (len(labels), *shape)), np.float32)
    return data.Dataset(
        name=name,
        train_images=images,
        train_labels=labels,
        test_images=images[:num_classes],
        test_labels=labels[:num_classes],
        num_classes=num_classes,
        mean=np.zeros(shape[-1], np.float32),
        std=np.ones(shape[-1], np.float32),
        zca=None,
    )
