"""Time, memory and FLOP efficiency of the real distillation steps (``steps_lib.make_step``).

    .venv/bin/python benchmarks/bench_step.py                 # default subset (12 rows): ~25 min
                                                              # on 2 idle cores; MTT rows 1-6 min
    .venv/bin/python benchmarks/bench_step.py --methods dm --ipcs 1,10,50 --shapes fmnist,cifar
    .venv/bin/python benchmarks/bench_step.py --methods mtt --syn_steps 10,20,40 --remat on,off
    .venv/bin/python benchmarks/bench_step.py --grid             # the whole grid (hours on 2 cores)

Every row is one configuration in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own.
The child builds the state with ``state_lib.init_state`` and the step with ``steps_lib.make_step`` from
the dataset's real config file (``configs/fashion_mnist.py`` / ``configs/cifar10.py``, so DM uses
batch_real 256 with siamese DSA, DC/DSA the reference loops unless ``--dc_loops``, MTT the config's
DSA student) on random data of the right shape (``--train_per_class`` images per class); MTT gets a
fake trajectory array [2, max_start_epoch + expert_epochs, P], P = ravel_pytree(params).size.

``--methods net`` times one training step of the bare ConvNet (forward, weight gradient, SGD
update; cross-entropy on ``--net_batch`` random images), the unit every inner loop repeats.

Per row:
- compile: trace + lower + XLA compile of the step (``step.lower(...).compile()``), seconds;
- s/iter: median over ``--iters`` timed calls of the compiled step (``block_until_ready``) after
  one warm-up call;
- peak RSS of the child process (on an accelerator also the device's ``peak_bytes_in_use``);
  XLA temp: ``compiled.memory_analysis().temp_size_in_bytes``;
- img/s: images pushed through the network per step / s (DM: C*(n_real + ipc); DC: the matched real
  and synthetic batches of every outer step plus the inner training epochs; MTT: syn_steps * batch);
- GFLOP: analytic model FLOPs per step (below); GFLOP/s and "% peak": that rate over the sgemm peak
  measured in the same child before and after the timed calls (the best of 2 x 5 jitted float32
  2048^3 ``jnp.dot``, 2*n^3 FLOPs);
- XLA GFLOP: ``compiled.cost_analysis()["flops"]``. XLA counts a scan/while body ONCE, not once per
  trip, so for MTT (scan over student steps) and DC (scan over outer steps, inner epochs) it is far
  below the work done; for DM (no loop) it should be close to the analytic count.

Analytic FLOPs (conv and dense layers only; norms, activations, pooling, DSA and the MI heads are
not counted, so "% peak" is a lower bound). Per layer l and image: f_l = 2 * MACs of the forward
pass (conv: 2*Ho*Wo*kh*kw*Cin*Cout, dense: 2*Din*Dout). A backward pass costs f_l for the input
gradient (skipped for the first layer unless the images are differentiated) plus f_l for the
weight gradient (skipped when the weights are not differentiated). Hence, with F = sum_l f_l:
- forward only: F; forward + input gradient: 2F; forward + weight gradient (training): 3F - f_0;
- second order (the gradient of a function that itself contains a forward + backward pass, as
  DC's gradient matching and MTT's unrolled student): every one of the 3 products per layer is
  differentiated w.r.t. both of its operands: 3F + 6F = 9F per image.
- net (one ConvNet training step on a batch of B images): B*(3F - f_0).
- DM: C*n_real*F (real side, no gradient) + C*ipc*2F (synthetic side, image gradient only).
- DC: per outer step, C*n_real*(3F - f_0) (real gradients) + C*ipc*9F (synthetic gradient
  matched, differentiated w.r.t. the images), plus (outer - 1) * inner_loop epochs of training on
  the C*ipc synthetic images, (3F - f_0) each.
- MTT: num_trajectories * syn_steps * batch_syn * 9F; remat adds 3F per image and step of
  recomputation, which is NOT counted (so remat on/off are compared on the same useful work).
- MI term (mi.weight > 0; its image gradient is taken apart from the base's, through the
  networks held fixed): DM reuses the real features and adds C*ipc*2F (the synthetic side
  again); DC adds C*n_real*F + C*ipc*2F; MTT adds C*n_real*F (expert on a real batch) +
  C*ipc*2F (the final student on the synthetic set; nothing flows back into the unroll).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import run_child  # noqa: E402

SHAPES = {"fmnist": ("fashion_mnist", (28, 28, 1)), "cifar": ("cifar10", (32, 32, 3))}


# ----------------------------------------------------------------------------------------------
# Analytic FLOPs.
# ----------------------------------------------------------------------------------------------


def layer_flops(shape, num_classes: int, width: int = 128, depth: int = 3) -> list[float]:
    """Forward FLOPs per image of each conv / dense layer of the ConvNet, first layer first."""
    h, w, cin = shape
    out = []
    for d in range(depth):
        pad = 3 if cin == 1 and d == 0 else 1
        h, w = h + 2 * pad - 2, w + 2 * pad - 2
        out.append(2.0 * h * w * 9 * cin * width)
        cin, h, w = width, h // 2, w // 2
    out.append(2.0 * h * w * cin * num_classes)
    return out


def step_flops(spec: dict, config, n_real: int) -> tuple[float, float]:
    """(model FLOPs per step, images through the network per step); see the module docstring."""
    c = 10
    f = layer_flops(spec["image_shape"], c, config.model.width, config.model.depth)
    big_f, f0 = sum(f), f[0]
    ipc, method, mi_on = config.ipc, config.method, bool(config.mi.weight)
    train = 3 * big_f - f0
    if spec["method"] == "net":
        return spec["net_batch"] * train, spec["net_batch"]
    if method == "dm":
        flops = c * n_real * big_f + c * ipc * 2 * big_f
        images = c * (n_real + ipc)
        if mi_on:  # the synthetic side again, for the separately taken MI image gradient
            flops += c * ipc * 2 * big_f
            images += c * ipc
    elif method in ("dc", "dsa"):
        outer, inner_ep = spec["outer"], spec["inner"]
        per_outer = c * n_real * train + c * ipc * 9 * big_f
        if mi_on:
            per_outer += c * n_real * big_f + c * ipc * 2 * big_f
        flops = outer * per_outer + (outer - 1) * inner_ep * c * ipc * train
        images = outer * c * (n_real + ipc) * (2 if mi_on else 1)
        images += (outer - 1) * inner_ep * c * ipc
        return flops, images
    else:
        batch = spec["batch_syn"]
        k = int(config.mtt.num_trajectories)
        flops = k * config.mtt.syn_steps * batch * 9 * big_f
        images = k * config.mtt.syn_steps * batch
        if mi_on:
            flops += c * n_real * big_f + c * ipc * 2 * big_f
            images += c * (n_real + ipc)
        return flops, images
    return flops, images


# ----------------------------------------------------------------------------------------------
# The child: one configuration.
# ----------------------------------------------------------------------------------------------


def sgemm_peak(n: int = 2048, reps: int = 5) -> float:
    """Best float32 n^3 matmul rate (FLOP/s) of this process, jitted."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(dot(a, b))
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _load_config(dataset_name: str, arg: str):
    name = {"fashion_mnist": "fashion_mnist", "cifar10": "cifar10"}[dataset_name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def build(spec: dict):
    """(config, dataset, state, step args) for one configuration."""
    import jax
    import jax.numpy as jnp

    from benchmarks import common
    from mim4dd_jax import config as config_lib
    from mim4dd_jax import data
    from mim4dd_jax import state as state_lib

    method, ipc = spec["method"], spec["ipc"]
    config = _load_config(spec["dataset"], f"{method},ipc{ipc}")
    overrides = {
        "mi.weight": spec["mi"],
        "conv_impl": spec["conv_impl"],
        "microbatch": spec.get("microbatch", 0),
    }
    if spec.get("real_chunk") is not None:
        overrides["distill.real_chunk"] = spec["real_chunk"]
    if spec.get("batch_real") is not None:
        overrides["distill.batch_real"] = spec["batch_real"]
    if method == "mtt":
        overrides.update({"mtt.syn_steps": spec["syn_steps"], "mtt.remat": spec["remat"]})
        overrides["mi.through_unroll"] = spec.get("mi_unroll", "off") == "on"
        if spec.get("batch_syn") is not None:
            overrides["mtt.batch_syn"] = spec["batch_syn"]
    if method in ("dc", "dsa") and spec.get("dc_loops"):
        outer, inner_ep = spec["dc_loops"]
        overrides.update({"distill.outer_loop": outer, "distill.inner_loop": inner_ep})
    for dotted, value in overrides.items():
        config_lib.set_dotted(config, dotted, value)

    c, shape, per_class = 10, tuple(spec["image_shape"]), spec["train_per_class"]
    dataset = common.random_dataset(spec["dataset"], c, per_class, shape)
    images, labels = dataset.train_images, dataset.train_labels
    state = state_lib.init_state(jax.random.key(0), dataset, config)
    experts = None
    if method == "mtt":
        experts = jnp.asarray(common.fake_trajectories(config, c, shape))
    real = jax.device_put(jnp.asarray(images))
    index = data.class_index(labels, c)
    return config, dataset, state, real, index, experts


def build_net(spec: dict):
    """(config, jitted donated train step, its arguments) for ``--methods net``."""
    import jax
    import jax.numpy as jnp

    from mim4dd_jax import inner, models

    config = _load_config(spec["dataset"], "dm,ipc10")
    config.conv_impl = spec["conv_impl"]
    config.microbatch = spec.get("microbatch", 0)
    model = models.build_model(config, 10)
    shape, batch = tuple(spec["image_shape"]), spec["net_batch"]
    x = jax.random.normal(jax.random.key(1), (batch, *shape), jnp.float32)
    y = jax.random.randint(jax.random.key(2), (batch,), 0, 10)
    params = inner.init_variables(model, jax.random.key(0), shape)["params"]

    def train_step(params, x, y):
        def loss(p):
            logits, _ = inner.apply_train(model, {"params": p}, x)
            return jnp.mean(inner.cross_entropy(logits, y))

        value, grads = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), value

    return config, jax.jit(train_step, donate_argnums=(0,)), (params, x, y)


def _time_calls(call, state, iters: int) -> tuple[float, list[float], object, object]:
    """(first call s, timed call s, final state, last metrics): one warm-up, then ``iters``."""
    import jax

    t0 = time.perf_counter()
    state, metrics = call(state, 0)
    jax.block_until_ready((state, metrics))
    first_s = time.perf_counter() - t0
    times = []
    for it in range(iters):
        t0 = time.perf_counter()
        state, metrics = call(state, it + 1)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return first_s, times, state, metrics


def measure(spec: dict) -> dict:
    import resource

    import jax

    from mim4dd_jax import objectives, steps_mtt
    from mim4dd_jax import steps as steps_lib

    peak = sgemm_peak()
    if spec["method"] == "net":
        config, step, (params, x, y) = build_net(spec)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        compiled = step.lower(params, x, y).compile()
        compile_s = time.perf_counter() - t0
        first_s, times, _, loss = _time_calls(lambda p, _: compiled(p, x, y), params, spec["iters"])
        return _result(spec, config, peak, compiled, compile_s, first_s, times, rss_before, loss)
    config, dataset, state, real, index, experts = build(spec)
    n_real = min(config.distill.batch_real, spec["train_per_class"])
    if config.method in ("dc", "dsa"):
        if config.distill.outer_loop and config.distill.inner_loop:
            spec["outer"], spec["inner"] = config.distill.outer_loop, config.distill.inner_loop
        else:
            spec["outer"], spec["inner"] = objectives.dc_loops(config.ipc)
    if config.method == "mtt":
        spec["batch_syn"] = int(config.mtt.batch_syn) or 10 * config.ipc
        spec["remat_on"] = steps_mtt.resolve_remat(config.mtt.remat)
    step = steps_lib.make_step(config, dataset)
    key = jax.random.key(3)
    jax.block_until_ready((state, real, index, experts))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    compiled = step.lower(state, key, real, index, experts).compile()
    compile_s = time.perf_counter() - t0
    if not spec["iters"]:
        return _result(spec, config, peak, compiled, compile_s, None, [], rss_before, None, n_real)

    def call(state, it):
        return compiled(state, jax.random.fold_in(key, it), real, index, experts)

    first_s, times, _, metrics = _time_calls(call, state, spec["iters"])
    return _result(
        spec, config, peak, compiled, compile_s, first_s, times, rss_before, metrics, n_real
    )


def _result(
    spec, config, peak, compiled, compile_s, first_s, times, rss_before, metrics, n_real=0
) -> dict:
    """One row's numbers (see the module docstring); metrics: the step's last metrics (a dict),
    the net step's loss, or None for a compile-only row."""
    import resource

    import jax

    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    flops, images = step_flops(spec, config, n_real)
    out = {
        **spec,
        "n_real": n_real,
        "sgemm_gflops": peak / 1e9,
        "compile_s": compile_s,
        "xla_temp_mib": getattr(mem, "temp_size_in_bytes", float("nan")) / 2**20,
        "gflop": flops / 1e9,
        "xla_gflop": float(cost.get("flops", float("nan"))) / 1e9,
        "images": images,
    }
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # On an accelerator the step's memory is the device's, not the process's RSS.
    device_stats = jax.local_devices()[0].memory_stats() or {}
    if device_stats.get("peak_bytes_in_use") is not None:
        out["device_peak_mib"] = device_stats["peak_bytes_in_use"] / 2**20
    if not times:  # compile only: XLA's memory plan, no run
        return {**out, "rss_peak_mib": rss_peak / 1024, "median_s": None}
    # The probe again after the timed calls: a neighbour's burst during one short probe would
    # otherwise understate the peak and overstate "% peak". The best of both is the peak.
    peak = max(peak, sgemm_peak())
    out["sgemm_gflops"] = peak / 1e9
    med = statistics.median(times)
    loss = metrics["loss"] if isinstance(metrics, dict) else metrics
    skipped = metrics["skipped"] if isinstance(metrics, dict) else 0
    return {
        **out,
        "first_s": first_s,
        "median_s": med,
        "min_s": min(times),
        "rss_peak_mib": rss_peak / 1024,
        "rss_growth_mib": (rss_peak - rss_before) / 1024,
        "img_per_s": images / med,
        "gflops": flops / med / 1e9,
        "frac_peak": flops / med / peak,
        "loss": float(loss),
        "skipped": int(skipped),
    }


# ----------------------------------------------------------------------------------------------
# The parent: the grid, one subprocess per row.
# ----------------------------------------------------------------------------------------------


def _csv(text: str, cast=str) -> list:
    return [cast(t) for t in text.split(",") if t.strip()]


def default_specs(common: dict) -> list[dict]:
    """The default subset: one ConvNet training step; FMNIST IPC 10 for DM (also in one pass,
    real_chunk 0) / DSA (one outer step, no inner training) / MTT 20 with and without MI; DM at
    IPC 1 and 50; MTT remat off at 10 steps (20 steps without remat needs ~16 GB here)."""
    base = {**common, "shape": "fmnist"}
    rows = [
        {"method": "net", "ipc": "-", "mi": "-"},
        {"method": "dm", "ipc": 10, "mi": 0.0},
        {"method": "dm", "ipc": 10, "mi": 0.0, "real_chunk": 0},
        {"method": "dm", "ipc": 10, "mi": 0.1},
        {"method": "dm", "ipc": 1, "mi": 0.0},
        {"method": "dm", "ipc": 50, "mi": 0.0},
        {"method": "dsa", "ipc": 10, "mi": 0.0, "dc_loops": [1, 1]},
        {"method": "dsa", "ipc": 10, "mi": 0.1, "dc_loops": [1, 1]},
        {"method": "mtt", "ipc": 10, "mi": 0.0, "syn_steps": 20, "remat": "on"},
        {"method": "mtt", "ipc": 10, "mi": 0.1, "syn_steps": 20, "remat": "on"},
        {"method": "mtt", "ipc": 10, "mi": 0.0, "syn_steps": 10, "remat": "on"},
        {"method": "mtt", "ipc": 10, "mi": 0.0, "syn_steps": 10, "remat": "off"},
    ]
    return [{**base, **r} for r in rows]


def grid_specs(args, common: dict) -> list[dict]:
    specs = []
    for shape, method, ipc, mi_w in itertools.product(
        _csv(args.shapes), _csv(args.methods), _csv(args.ipcs, int), _csv(args.mi, float)
    ):
        row = {**common, "shape": shape, "method": method, "ipc": ipc, "mi": mi_w}
        if method == "net":  # no IPC, no MI: one row per shape and conv impl
            row.update(ipc="-", mi="-")
            if row not in specs:
                specs.append(row)
        elif method in ("dc", "dsa"):
            loops = _csv(args.dc_loops, int) if args.dc_loops else None
            specs.append({**row, "dc_loops": loops})
        elif method == "mtt":
            unrolls = _csv(args.mi_unroll) if mi_w else ["off"]
            for steps, remat, unroll in itertools.product(
                _csv(args.syn_steps, int), _csv(args.remat), unrolls
            ):
                specs.append({**row, "syn_steps": steps, "remat": remat, "mi_unroll": unroll})
        else:
            chunks = _csv(args.real_chunk, int) if args.real_chunk else [None]
            batches = _csv(args.batch_real, int) if args.batch_real else [None]
            for chunk, batch in itertools.product(chunks, batches):
                specs.append({**row, "real_chunk": chunk, "batch_real": batch})
    return specs


def _label(r: dict) -> str:
    extra = ""
    if r["method"] in ("dc", "dsa"):
        extra = f" loops {r['outer']}x{r['inner']}" if "outer" in r else ""
    if r["method"] == "mtt":
        extra = f" S{r['syn_steps']} B{r.get('batch_syn', '?')} remat {r['remat']}"
        if r.get("mi_unroll") == "on":
            extra += " MI through unroll"
    if r["method"] == "net":
        extra = f" train step B{r['net_batch']}"
    if r.get("real_chunk") is not None:
        extra = f" real_chunk {r['real_chunk']}"
    if r.get("batch_real") is not None:
        extra += f" batch_real {r['batch_real']}"
    impl = "" if r.get("conv_impl", "auto") == "auto" else f" [{r['conv_impl']}]"
    if r.get("microbatch"):
        impl += f" microbatch {r['microbatch']}"
    return f"{r['method']}{extra}{impl}"


HEADER = (
    "| shape | method | IPC | MI | compile s | s/iter (med) | peak RSS MiB | XLA temp MiB "
    "| img/s | GFLOP/step | XLA GFLOP | GFLOP/s | sgemm GFLOP/s | % peak |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def row_text(spec: dict, r: dict | str) -> str:
    if isinstance(r, str):
        return f"| {spec['shape']} | {_label(spec)} | {spec['ipc']} | {spec['mi']} | {r} |"
    if r["median_s"] is None:
        return (
            f"| {r['shape']} | {_label(r)} | {r['ipc']} | {r['mi']} | {r['compile_s']:.1f} "
            f"| (compile only) | {r['rss_peak_mib']:.0f} | {r['xla_temp_mib']:.0f} | "
            f"| {r['gflop']:.1f} | {r['xla_gflop']:.1f} | | {r['sgemm_gflops']:.1f} | |"
        )
    memory = f"{r['rss_peak_mib']:.0f}"
    if "device_peak_mib" in r:
        memory += f" (device {r['device_peak_mib']:.0f})"
    return (
        f"| {r['shape']} | {_label(r)} | {r['ipc']} | {r['mi']} | {r['compile_s']:.1f} "
        f"| {r['median_s']:.3f} | {memory} | {r['xla_temp_mib']:.0f} "
        f"| {r['img_per_s']:.0f} | {r['gflop']:.1f} | {r['xla_gflop']:.1f} | {r['gflops']:.1f} "
        f"| {r['sgemm_gflops']:.1f} | **{100 * r['frac_peak']:.0f}** |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--methods",
        default=None,
        help="dm,dc,dsa,mtt,net (setting any grid flag "
        "replaces the default subset by the grid of the given flags)",
    )
    p.add_argument("--shapes", default="fmnist", help="fmnist (28x28x1), cifar (32x32x3)")
    p.add_argument("--ipcs", default="10")
    p.add_argument("--mi", default="0,0.1", help="mi.weight values")
    p.add_argument("--syn_steps", default="20", help="MTT syn_steps values")
    p.add_argument("--remat", default="on,off", help="MTT mtt.remat values")
    p.add_argument("--batch_syn", type=int, default=None, help="MTT minibatch (default: config)")
    p.add_argument(
        "--mi_unroll", default="off", help="MTT rows with MI: mi.through_unroll values (off,on)"
    )
    p.add_argument("--dc_loops", default="", help="outer,inner for DC/DSA (default: reference)")
    p.add_argument("--grid", action="store_true", help="the full grid of the issue")
    p.add_argument(
        "--iters",
        type=int,
        default=5,
        help="timed calls per row after a warm-up; "
        "0 = compile only (XLA's memory plan and FLOP count, no run)",
    )
    p.add_argument("--train_per_class", type=int, default=300)
    p.add_argument("--net_batch", type=int, default=256, help="batch of --methods net")
    p.add_argument(
        "--real_chunk", default="", help="DM rows: distill.real_chunk values (default: config's)"
    )
    p.add_argument(
        "--batch_real", default="", help="DM rows: distill.batch_real values (default: config's)"
    )
    p.add_argument(
        "--conv_impl", default="auto", help="config.conv_impl values: auto, im2col, xla, ..."
    )
    p.add_argument(
        "--microbatch", default="0", help="config.microbatch values (0 = whole batch; issue 15)"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    p.add_argument("--title", default="Distillation steps (issue 5)")
    p.add_argument("--no-append", action="store_true", help="only print the table")
    args = p.parse_args()
    common = {
        "iters": args.iters,
        "train_per_class": args.train_per_class,
        "batch_syn": args.batch_syn,
        "net_batch": args.net_batch,
    }
    if args.grid:
        args.methods, args.shapes, args.ipcs = "dm,dsa,mtt", "fmnist,cifar", "1,10,50"
        args.syn_steps, args.remat = "10,20,40", "on,off"
    specs = grid_specs(args, common) if args.methods else default_specs(common)
    specs = [
        {**s, "microbatch": m, "conv_impl": impl}
        for s in specs
        for impl in _csv(args.conv_impl)
        for m in _csv(args.microbatch, int)
    ]
    for s in specs:
        s["dataset"], s["image_shape"] = SHAPES[s["shape"]]
    print(HEADER, flush=True)
    lines = []
    for spec in specs:
        res = run_child(__file__, ["--child", json.dumps(spec)], timeout=args.timeout)
        lines.append(row_text(spec, res))
        print(lines[-1], flush=True)
    body = (
        "Real `steps_lib.make_step` steps on random data of the dataset's shape, each row a fresh "
        f"subprocess; median of {args.iters} calls after compile + 1 warm-up. GFLOP/step is the "
        "analytic conv+dense count (see the docstring of benchmarks/bench_step.py; remat "
        "recomputation not counted); '% peak' = GFLOP/s over the float32 2048^3 sgemm rate "
        "measured in the same process. XLA GFLOP = `cost_analysis()` of the compiled step, which "
        "counts a scan body once (MTT, DC).\n\n" + HEADER + "\n" + "\n".join(lines)
    )
    if not args.no_append:
        from benchmarks.common import append_section

        append_section(args.title, body)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(json.dumps(measure(json.loads(sys.argv[2]))))
    else:
        main()
