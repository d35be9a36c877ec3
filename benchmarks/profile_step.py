"""Where a distillation step's time goes, per compiled XLA op (issue 5's "profile that shows why").

    python benchmarks/profile_step.py --method mtt --syn_steps 5      # MTT, Fashion-MNIST IPC 10
    python benchmarks/profile_step.py --method dm                      # DM step

Builds the step exactly as ``bench_step.py`` does (same config, random data), runs one warm-up
call, then one call under ``jax.profiler.trace`` and sums the trace's events per XLA op
(fusion, dot, concatenate, ...). Each op is classified from the optimised HLO: "GEMM" when its
fused computation contains a dot or convolution (with the dot's output shape), "memory" otherwise
(elementwise, reductions, concatenates, pads, transposes). Prints the top ``--top`` ops and the
GEMM / memory split. Writes nothing to BENCHMARKS.md: copy what matters.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hlo_ops(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(op name -> its defining line, computation name -> its body lines) of an HLO module."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in text.split("\n"):
        if line and not line.startswith(" ") and line.endswith("{"):
            current = line.split(" ")[0].lstrip("%")
            comps[current] = []
        elif line.startswith("}"):
            current = None
        elif current is not None:
            comps[current].append(line)
    defs = {}
    for body in comps.values():
        for line in body:
            m = re.match(r"\s+(?:ROOT )?%([\w.\-]+) = (.*)", line)
            if m:
                defs[m.group(1)] = m.group(2)
    return defs, comps


def describe(name: str, defs: dict[str, str], comps: dict[str, list[str]]) -> tuple[str, str]:
    """(kind "GEMM"/"memory"/"other", a one-line description) of the HLO op ``name``."""
    line = defs.get(name)
    if line is None:
        return "other", ""
    shape = line.split(" ")[0]
    op_name = re.search(r'op_name="([^"]+)"', line)
    where = "/".join(op_name.group(1).split("/")[-3:]) if op_name else ""
    calls = re.search(r"calls=%([\w.\-]+)", line)
    body = "\n".join(comps.get(calls.group(1), [])) if calls else line
    gemms = re.findall(r"= (\S+) (?:dot|convolution)\(", body)
    if not calls and re.search(r"\s(?:dot|convolution)\(", " " + line):
        gemms = [shape]
    kind = "GEMM" if gemms else "memory"
    detail = f"dot -> {','.join(gemms)}" if gemms else ""
    return kind, f"{shape} {detail} {where}".strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="mtt", help="dm, dsa or mtt")
    p.add_argument("--shape", default="fmnist", help="fmnist or cifar")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--mi", type=float, default=0.0)
    p.add_argument("--syn_steps", type=int, default=5)
    p.add_argument("--conv_impl", default="auto")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()

    import jax

    from benchmarks import bench_step
    from mim4dd_jax import steps as steps_lib

    dataset_name, image_shape = bench_step.SHAPES[args.shape]
    spec = {
        "method": args.method,
        "ipc": args.ipc,
        "mi": args.mi,
        "conv_impl": args.conv_impl,
        "dataset": dataset_name,
        "image_shape": image_shape,
        "train_per_class": 300,
        "syn_steps": args.syn_steps,
        "remat": "on",
        "batch_syn": None,
        "dc_loops": [1, 1],
    }
    config, dataset, state, real, index, experts = bench_step.build(spec)
    step = steps_lib.make_step(config, dataset)
    key = jax.random.key(3)
    compiled = step.lower(state, key, real, index, experts).compile()
    defs, comps = _hlo_ops(compiled.as_text())
    state, _ = compiled(state, key, real, index, experts)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            state, _ = compiled(state, jax.random.fold_in(key, 1), real, index, experts)
            jax.block_until_ready(state)
        wall = time.perf_counter() - t0
        path = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    total_us: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in defs:
            total_us[e["name"]] += e.get("dur", 0)
            calls[e["name"]] += 1
    by_kind: collections.Counter = collections.Counter()
    rows = []
    for name, us in total_us.most_common():
        kind, text = describe(name, defs, comps)
        by_kind[kind] += us
        rows.append(f"| {us / 1e3:.1f} | {calls[name]} | {kind} | `{name}` {text} |")
    op_total = sum(by_kind.values())
    print(f"{args.method} {args.shape} ipc {args.ipc}: one step {wall:.2f} s under the profiler")
    print("| ms | calls | kind | op |\n|---:|---:|---|---|")
    print("\n".join(rows[: args.top]))
    for kind, us in by_kind.most_common():
        print(f"{kind}: {us / 1e3:.0f} ms ({100 * us / op_total:.0f}% of the op time)")


if __name__ == "__main__":
    main()
