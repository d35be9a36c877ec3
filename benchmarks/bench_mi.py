"""Time and peak memory of one MI loss + gradient as N_syn x N_real grows (issue 3).

    .venv/bin/python benchmarks/bench_mi.py            # prints the table, appends to BENCHMARKS.md
    .venv/bin/python benchmarks/bench_mi.py --no-append --sizes 100x1000

Each (size, mode) runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own. The
measured function is ``jax.value_and_grad`` of ``mi.embedding_mi`` (InfoNCE, cosine critic, hard
labels over 10 classes) with respect to both embedding sets, 128-d, jitted. Reported per run:
compile time; the median (and min) of ``--reps`` timed calls after compilation; peak RSS of the
whole process and its growth over the RSS just before compiling; and XLA's own buffer accounting
from ``compiled.memory_analysis()`` (temporaries, the part that grows with N_syn x N_real).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import run_child  # noqa: E402
from mim4dd_jax import artifacts  # noqa: E402

HEADING = "## MI loss scaling (issue 3)"


def _measure(ns: int, nr: int, chunk: int | None, reps: int, dim: int) -> dict:
    """Runs in the child process: one configuration, returns the numbers as a dict."""
    import resource

    import jax

    from mim4dd_jax import mi

    key = jax.random.PRNGKey(0)
    k = jax.random.split(key, 4)
    z_syn = jax.random.normal(k[0], (ns, dim))
    z_real = jax.random.normal(k[1], (nr, dim))
    y_syn = jax.random.randint(k[2], (ns,), 0, 10)
    y_real = jax.random.randint(k[3], (nr,), 0, 10)

    def loss(a, b):
        return -mi.embedding_mi(
            real=b, syn=a, real_labels=y_real, syn_labels=y_syn, temperature=0.07, chunk_size=chunk
        )

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    jax.block_until_ready((z_syn, z_real, y_syn, y_real))
    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    compiled = fn.lower(z_syn, z_real).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(z_syn, z_real))  # warm-up call
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(z_syn, z_real))
        times.append(time.perf_counter() - start)
    rss_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    analysis = compiled.memory_analysis()
    return {
        "compile_s": compile_s,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "rss_peak_mib": rss_peak_kib / 1024,
        "rss_growth_mib": (rss_peak_kib - rss_before_kib) / 1024,
        "xla_temp_mib": getattr(analysis, "temp_size_in_bytes", float("nan")) / 2**20,
        "xla_args_out_mib": (
            getattr(analysis, "argument_size_in_bytes", float("nan"))
            + getattr(analysis, "output_size_in_bytes", float("nan"))
        )
        / 2**20,
    }


def _child_main(argv: list[str]) -> None:
    ns, nr, chunk, reps, dim = (int(a) for a in argv)
    print(json.dumps(_measure(ns, nr, chunk or None, reps, dim)))


def _run_one(ns: int, nr: int, chunk: int, reps: int, dim: int, timeout: float) -> dict | str:
    args = ["--child", str(ns), str(nr), str(chunk), str(reps), str(dim)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return run_child(__file__, args, timeout=timeout, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100x1000,500x5000,1000x10000", help="NSxNR,...")
    parser.add_argument("--chunk", type=int, default=512, help="real candidates per chunk")
    parser.add_argument("--reps", type=int, default=5, help="timed calls after compiling")
    parser.add_argument("--dim", type=int, default=128, help="embedding width")
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per configuration")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    parser.add_argument("--no-append", action="store_true", help="only print the table")
    args = parser.parse_args()

    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    rows = [
        "| N_syn x N_real | mode | compile (s) | median (s) | min (s) | peak RSS (MiB) "
        "| RSS growth (MiB) | XLA temp (MiB) | XLA args+out (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ns, nr in sizes:
        for chunk in (0, args.chunk):
            mode = "one-shot" if chunk == 0 else f"chunked ({args.chunk})"
            res = _run_one(ns, nr, chunk, args.reps, args.dim, args.timeout)
            if isinstance(res, str):
                rows.append(f"| {ns} x {nr} | {mode} | {res} | | | | | | |")
            else:
                rows.append(
                    f"| {ns} x {nr} | {mode} | {res['compile_s']:.2f} | {res['median_s']:.4f} "
                    f"| {res['min_s']:.4f} | {res['rss_peak_mib']:.0f} "
                    f"| {res['rss_growth_mib']:.0f} | {res['xla_temp_mib']:.1f} "
                    f"| {res['xla_args_out_mib']:.1f} |"
                )
            print(rows[-1], flush=True)
    command = "python benchmarks/bench_mi.py " + " ".join(sys.argv[1:])
    section = "\n".join(
        [
            "",
            HEADING,
            "",
            f"- date: {datetime.date.today().isoformat()}",
            f"- command: `{command.strip()}`",
            f"- CPU: {artifacts.cpu_model() or 'unknown'}, {os.cpu_count()} cores visible (shared with other jobs)",
            f"- measured: jit(value_and_grad) of `mi.embedding_mi` (InfoNCE, cosine, 10 classes), "
            f"{args.dim}-d embeddings, gradient w.r.t. both embedding sets; median of "
            f"{args.reps} calls after compile and one warm-up call",
            "- memory: each row is a fresh subprocess. 'peak RSS' is `ru_maxrss` of that process "
            "(includes the JAX runtime, ~the smallest row's value); 'RSS growth' is peak RSS minus "
            "`ru_maxrss` just before compiling; 'XLA temp' is "
            "`compiled.memory_analysis().temp_size_in_bytes` (intermediate buffers, the part that "
            "scales with N_syn x N_real); 'XLA args+out' is inputs plus outputs",
            "",
            *rows,
            "",
        ]
    )
    print(section)
    if not args.no_append:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(section)
        print(f"appended to {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child_main(sys.argv[2:])
    else:
        main()
