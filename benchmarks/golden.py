"""Golden references that run on every machine (issue 28): one step each of DC, DSA, DM and MTT
and the evaluation protocol's trainer on a tiny fixed input, reduced to a few numbers (losses,
image-gradient entries, norms), stored in ``tests/fixtures/golden.json`` with tolerances set from
measured float noise; ``tests/test_golden.py`` recomputes and compares them.

    python benchmarks/golden.py --noise     # measure the noise: this process vs. variants
    python benchmarks/golden.py --write     # record the numbers and tolerances (after --noise)
    python benchmarks/golden.py             # print the numbers

Noise: the same numbers computed under XLA variants that change float rounding but not the
math (one thread instead of several; XLA's own convolution instead of our im2col, which the
ConvNet ``conv_impl`` chooses; MTT's student with and without rematerialisation). The tolerance
of each number is 100x the largest relative difference seen (at least 1e-4, since these variants
do not cover other CPU kinds): a changed formula moves these numbers by 1e-3 or more.

Inputs: ``tests/helpers.fake_dataset(3, 12, 8)`` (gaussian images whose mean is the class), a
ConvNet of width 8 and depth 2, IPC 2, seed 0; everything random comes from ``jax.random``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (ROOT, os.path.join(ROOT, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

FIXTURE = os.path.join(ROOT, "tests", "fixtures", "golden.json")
C, PER_CLASS, HW, IPC = 3, 12, 8, 2
# A few fixed entries of the flattened [C * IPC * HW * HW] image update (C * IPC = 6 images of
# 64 pixels): corners and middles of different images.
PICK = (0, 7, 100, 191, 250, 383)
MTT = {
    "mtt.syn_steps": 3,
    "mtt.expert_epochs": 1,
    "mtt.max_start_epoch": 2,
    "mtt.remat": "off",
    "distill.lr": 10.0,
}
# Variants whose numbers must agree up to rounding: (name, environment, config overrides).
VARIANTS = (
    ("one thread", {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}, {}),
    ("xla convolution", {}, {"conv_impl": "xla"}),
    ("mtt remat", {}, {"mtt.remat": "on"}),
)


def _config(arg: str, **overrides: Any):
    from helpers import tiny_config

    extra = MTT if arg.startswith("mtt") else {}
    return tiny_config(arg, **{"mi.weight": 0.0, **extra, **overrides})


def _fake_experts(config, dataset, num: int = 2, epochs: int = 2):
    """[num, epochs + 1, P] trajectories: random inits drifting a little per epoch."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from mim4dd_jax import inner, models

    model = models.build_model(config, dataset.num_classes)
    out = []
    for e in range(num):
        variables = inner.init_variables(model, jax.random.key(10 + e), dataset.image_shape)
        flat = ravel_pytree(variables["params"])[0]
        drift = 0.05 * jax.random.normal(jax.random.key(20 + e), flat.shape)
        out.append(jnp.stack([flat + t * drift for t in range(epochs + 1)]))
    return jnp.stack(out)


def one_step(arg: str, **overrides: Any) -> dict[str, list[float]]:
    """One ``steps_lib.make_step`` step of ``arg`` from ``init_state``: its loss, the image update's
    norm and PICK entries, and (MTT) the learned lr after the step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from helpers import fake_dataset

    from mim4dd_jax import data
    from mim4dd_jax import state as state_lib
    from mim4dd_jax import steps as steps_lib

    dataset = fake_dataset(C, PER_CLASS, HW)
    config = _config(arg, **overrides)
    key = jax.random.key(0)
    state = state_lib.init_state(jax.random.fold_in(key, 0), dataset, config)
    before = np.array(state["images"], copy=True)
    experts = _fake_experts(config, dataset) if config.method == "mtt" else None
    step = steps_lib.make_step(config, dataset)
    real = jnp.asarray(dataset.train_images)
    index = data.class_index(dataset.train_labels, C)
    state, metrics = step(state, jax.random.fold_in(key, 1), real, index, experts)
    metrics = jax.device_get(metrics)
    assert int(metrics["skipped"]) == 0
    update = (np.asarray(state["images"]) - before).reshape(-1)
    out = {
        "loss": [float(metrics["loss"])],
        "grad_norm_base": [float(metrics["grad_norm_base"])],
        "update_norm": [float(np.linalg.norm(update))],
        "update_entries": [float(update[i]) for i in PICK],
    }
    if config.method == "mtt":
        out["syn_lr"] = [float(np.asarray(state["syn_lr"]))]
    return out


def evaluation_trainer(**overrides: Any) -> dict[str, list[float]]:
    """The evaluation protocol's trainer (``inner.train_classifier``: SGD momentum 0.9, weight
    decay 5e-4, lr decay at half-way, 4 passes in batches of 4) on the fake train split: the
    trained parameters' norm and the logits of the first 2 test images."""
    import jax
    import numpy as np
    from helpers import fake_dataset

    from mim4dd_jax import inner, models

    dataset = fake_dataset(C, PER_CLASS, HW)
    config = _config("dm,ipc2", **overrides)
    model = models.build_model(config, C)
    variables = inner.train_classifier(
        jax.random.key(3),
        jax.numpy.asarray(dataset.train_images),
        jax.numpy.asarray(dataset.train_labels),
        0.01,
        model=model,
        config=inner.TrainConfig(epochs=3, batch_size=4),
    )
    flat = jax.flatten_util.ravel_pytree(variables["params"])[0]
    logits = model.apply(variables, dataset.test_images[:2], train=False)
    return {
        "params_norm": [float(np.linalg.norm(np.asarray(flat)))],
        "logits": [float(v) for v in np.asarray(logits).reshape(-1)],
    }


def compute(**overrides: Any) -> dict[str, dict[str, list[float]]]:
    """Every golden number: {case: {quantity: [values]}}."""
    import jax.flatten_util  # noqa: F401  (jax.flatten_util is a submodule)

    out = {m: one_step(f"{m},ipc{IPC}", **overrides) for m in ("dc", "dsa", "dm", "mtt")}
    out["evaluation"] = evaluation_trainer(**overrides)
    return out


def relative_differences(a: dict, b: dict) -> dict[str, dict[str, float]]:
    """Per (case, quantity): max |a - b| / max(|a|, scale), scale = the quantity's largest |a|
    times 1e-3 (entries near zero are judged against their vector, not themselves)."""
    import numpy as np

    out: dict[str, dict[str, float]] = {}
    for case, quantities in a.items():
        for name, values in quantities.items():
            x, y = np.asarray(values, np.float64), np.asarray(b[case][name], np.float64)
            scale = np.maximum(np.abs(x), 1e-3 * np.abs(x).max() + 1e-30)
            out.setdefault(case, {})[name] = float(np.max(np.abs(x - y) / scale))
    return out


def _run_variant(env: dict[str, str], overrides: dict[str, Any]) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); import golden; "
        f"print(json.dumps(golden.compute(**{overrides!r})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_noise() -> dict[str, dict[str, float]]:
    """The largest relative difference of every number over VARIANTS."""
    base = compute()
    noise: dict[str, dict[str, float]] = {}
    for name, env, overrides in VARIANTS:
        diffs = relative_differences(base, _run_variant(env, overrides))
        print(f"{name}: " + json.dumps(diffs), flush=True)
        for case, quantities in diffs.items():
            for q, d in quantities.items():
                noise.setdefault(case, {})[q] = max(noise.get(case, {}).get(q, 0.0), d)
    return noise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--noise", action="store_true", help="measure the noise over VARIANTS")
    parser.add_argument("--write", action="store_true", help="write tests/fixtures/golden.json")
    args = parser.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if not (args.noise or args.write):
        print(json.dumps(compute(), indent=1))
        return 0
    import jax

    from mim4dd_jax import artifacts

    noise = measure_noise()
    print("noise: " + json.dumps(noise, indent=1))
    if args.write:
        values = compute()
        record = {
            "about": "benchmarks/golden.py: one step of DC, DSA, DM, MTT and the evaluation "
            "trainer on a tiny fixed input; rtol = 100 x the noise measured between XLA variants "
            "on one machine, at least 1e-4",
            "recorded_with": {"jax": jax.__version__, "cpu": artifacts.cpu_model()},
            "values": values,
            "noise": noise,
            "rtol": {
                case: {q: max(1e-4, 100 * d) for q, d in quantities.items()}
                for case, quantities in noise.items()
            },
        }
        os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
        artifacts.write_json(FIXTURE, record, indent=1, sort_keys=True)
        print(f"wrote {FIXTURE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
