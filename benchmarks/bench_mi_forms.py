"""s/iter of MTT with the MIM4DD term in its two forms, against pure MTT, timed in one process.

    .venv/bin/python benchmarks/bench_mi_forms.py                  # Fashion-MNIST, MTT IPC 1
    .venv/bin/python benchmarks/bench_mi_forms.py --ipc 10 --rounds 3

Arms (the study benchmarks/studies/mim4dd_paper's MTT cells, at the config's MTT setting for the
IPC: syn_steps 50 at IPC 1, remat as on this backend): pure MTT (mi.weight 0); the current wiring
(student held fixed for the MI term, one shared head); the paper's form (mi.through_unroll, per-side
heads). The three compiled steps are called in turns (A B C A B C ...), so a neighbour's load
falls on every arm alike; the ratios to pure MTT are the numbers to quote, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = {
    "pure MTT": {"mi.weight": 0.0},
    "MI, student fixed, shared head": {"mi.weight": 0.1},
    "MI through the unroll, per-side heads": {
        "mi.weight": 0.1,
        "mi.through_unroll": True,
        "mi.heads": "per_side",
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5, help="timed calls per arm, in turns")
    p.add_argument("--train_per_class", type=int, default=300)
    p.add_argument("--no-append", action="store_true", help="only print the table")
    args = p.parse_args()

    import jax

    from benchmarks import common
    from benchmarks.bench_step import _load_config
    from mim4dd_jax import config as config_lib
    from mim4dd_jax import data
    from mim4dd_jax import state as state_lib
    from mim4dd_jax import steps as steps_lib

    shape, classes = (28, 28, 1), 10
    dataset = common.random_dataset("fashion_mnist", classes, args.train_per_class, shape)
    real = jax.device_put(jax.numpy.asarray(dataset.train_images))
    index = data.class_index(dataset.train_labels, classes)
    key = jax.random.key(3)
    arms = {}
    for name, overrides in ARMS.items():
        config = _load_config("fashion_mnist", f"mtt,ipc{args.ipc}")
        for dotted, value in {"mi.weight_mode": "relative", **overrides}.items():
            config_lib.set_dotted(config, dotted, value)
        experts = jax.numpy.asarray(common.fake_trajectories(config, classes, shape))
        state = state_lib.init_state(jax.random.key(0), dataset, config)
        step = steps_lib.make_step(config, dataset)
        t0 = time.perf_counter()
        compiled = step.lower(state, key, real, index, experts).compile()
        compile_s = time.perf_counter() - t0
        state, _ = compiled(state, key, real, index, experts)  # warm-up
        jax.block_until_ready(state)
        arms[name] = {"call": compiled, "state": state, "experts": experts, "times": []}
        arms[name]["compile_s"] = compile_s
    for it in range(args.rounds):
        for arm in arms.values():
            t0 = time.perf_counter()
            arm["state"], metrics = arm["call"](
                arm["state"], jax.random.fold_in(key, it + 1), real, index, arm["experts"]
            )
            jax.block_until_ready((arm["state"], metrics))
            arm["times"].append(time.perf_counter() - t0)
    base = statistics.median(arms["pure MTT"]["times"])
    lines = ["| arm | compile s | s/iter (median) | x pure MTT |", "|---|---:|---:|---:|"]
    for name, arm in arms.items():
        med = statistics.median(arm["times"])
        lines.append(f"| {name} | {arm['compile_s']:.0f} | {med:.2f} | {med / base:.2f} |")
    body = (
        f"MTT IPC {args.ipc} on Fashion-MNIST shapes (random data, fake trajectories), the three "
        f"steps compiled, then called in turns, {args.rounds} timed calls each.\n\n"
        + "\n".join(lines)
    )
    print(body, flush=True)
    if not args.no_append:
        common.append_section("MIM4DD forms: s/iter of MTT +- MI (issue 25)", body)


if __name__ == "__main__":
    main()
