"""The DM and MTT steps on 1, 2 and 4 simulated CPU devices (``config.mesh``), one subprocess each.

    python benchmarks/bench_sharding.py [--devices 1,2,4] [--methods dm,mtt] [--iters 3]
                                        [--classes 10] [--no-append]

Each row is a fresh process with ``XLA_FLAGS=--xla_force_host_platform_device_count=D`` set
before jax is imported, so the D "devices" share this machine's cores: the table shows that the
sharded step runs, gives the same loss, and what splitting it costs; it cannot show a speed-up.
The child builds the real step (``steps_lib.make_step``, ``configs``' defaults via
``config.build``) on random CIFAR-shaped data: ConvNet-3 (width 128), 32x32x3, ``--classes``
classes. DM: IPC 10, 64 real images per class, siamese DSA. MTT: IPC 1 (``--classes`` images),
4 (expert, start) pairs (one per device at D = 4), 5 student steps on all images, DSA; fake
trajectories [2, 4, P]. Per row: compile s (lower + compile), s/iter (median of ``--iters``
timed calls after one warm-up), the first step's loss, and the collectives XLA put in the
compiled program (ops inside a loop body counted once; bytes = the op's output size).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import run_child  # noqa: E402

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "pred": 1, "f16": 2, "bf16": 2, "s64": 8, "f64": 8}


def collectives(hlo: str) -> dict[str, list[int]]:
    """{op: [output bytes of each occurrence]} of the collective ops in compiled HLO text."""
    out: dict[str, list[int]] = {}
    for line in hlo.splitlines():
        for op in COLLECTIVES:
            m = re.search(rf"= (.+?) {op}(-start)?\(", line)
            if not m:
                continue
            shapes = re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
            size = 0
            for dtype, dims in shapes:
                n = 1
                for d in filter(None, dims.split(",")):
                    n *= int(d)
                size += n * _BYTES.get(dtype, 4)
            out.setdefault(op, []).append(size)
    return out


def child(spec: dict) -> dict:
    """One (method, devices) row, in this process (XLA_FLAGS already set by the parent)."""
    import jax

    from benchmarks import common
    from mim4dd_jax import config as config_lib
    from mim4dd_jax import data, sharding
    from mim4dd_jax import state as state_lib
    from mim4dd_jax import steps as steps_lib

    method, c = spec["method"], spec["classes"]
    shape = (32, 32, 3)
    config = config_lib.build({"name": "cifar10"}, f"{method},ipc{10 if method == 'dm' else 1}")
    overrides = {"distill.batch_real": 64}
    if method == "mtt":
        overrides.update(
            {
                "mtt.num_trajectories": 4,
                "mtt.syn_steps": 5,
                "mtt.expert_epochs": 2,
                "mtt.max_start_epoch": 2,
            }
        )
    for dotted, value in overrides.items():
        config_lib.set_dotted(config, dotted, value)
    per_class = 64
    dataset = common.random_dataset("cifar10", c, per_class, shape)
    images, labels = dataset.train_images, dataset.train_labels
    mesh = sharding.mesh_from_config(config)
    everywhere = sharding.replicated(mesh)
    state = state_lib.place_state(
        state_lib.init_state(jax.random.key(0), dataset, config), mesh, config
    )
    real = sharding.put(images, everywhere)
    index = data.class_index(labels, c)
    experts = None
    if method == "mtt":
        experts = sharding.put(common.fake_trajectories(config, c, shape), everywhere)
    step = steps_lib.make_step(config, dataset)
    t0 = time.perf_counter()
    compiled = step.lower(state, jax.random.key(1), real, index, experts).compile()
    compile_s = time.perf_counter() - t0
    found = collectives(compiled.as_text())
    state, metrics = step(state, jax.random.key(1), real, index, experts)  # warm-up
    loss = float(metrics["loss"])
    times = []
    for it in range(spec["iters"]):
        t0 = time.perf_counter()
        state, metrics = step(state, jax.random.key(2 + it), real, index, experts)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {
        "devices": jax.device_count(),
        "compile_s": compile_s,
        "s_per_iter": statistics.median(times),
        "loss": loss,
        "collectives": found,
    }


def run_spec(spec: dict) -> dict | str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={spec['devices']}".strip()
    return run_child(__file__, ["--child", json.dumps(spec)], env=env)


def describe(found: dict[str, list[int]]) -> str:
    if not found:
        return "none"
    parts = []
    for op, sizes in sorted(found.items()):
        parts.append(f"{len(sizes)} {op} ({sum(sizes) / 1024:.1f} KiB)")
    return ", ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", default="1,2,4")
    p.add_argument("--methods", default="dm,mtt")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--no-append", action="store_true")
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    rows = []
    for method in args.methods.split(","):
        base = None
        for d in (int(x) for x in args.devices.split(",")):
            spec = {"method": method, "devices": d, "iters": args.iters, "classes": args.classes}
            r = run_spec(spec)
            if isinstance(r, str):
                rows.append(f"| {method} | {d} | {r} | | | | |")
            else:
                base = base or r
                rows.append(
                    f"| {method} | {d} | {r['compile_s']:.1f} | {r['s_per_iter']:.2f} | "
                    f"{r['s_per_iter'] / base['s_per_iter']:.2f} | {r['loss']:.6g} | "
                    f"{describe(r['collectives'])} |"
                )
            print(rows[-1], flush=True)
    body = (
        f"ConvNet-3 (width 128) on random 32x32x3 data, {args.classes} classes. DM: IPC 10, 64 real "
        "images per class, DSA. MTT: IPC 1, 4 (expert, start) pairs, 5 student steps on all "
        f"images, DSA. Median of {args.iters} steps after a warm-up; the D simulated devices "
        "share the same cores.\n\n"
        "| method | devices | compile s | s/iter | vs 1 device | first loss | collectives in "
        "the compiled step |\n|---|---:|---:|---:|---:|---:|---|\n" + "\n".join(rows)
    )
    if args.no_append:
        print(body)
    else:
        from benchmarks.common import append_section

        append_section(
            "Sharding: DM and MTT steps on 1, 2, 4 simulated CPU devices (issue 6)", body
        )


if __name__ == "__main__":
    main()
