"""A study's tables from its committed results: per cell and evaluation model the final and
best accuracy over seeds, cost and the published number (``summary_frame``), the paired
differences of cells that differ in one ``compare`` field (``paired_differences``), their
markdown and the accuracy curves. ``report`` writes table.md, table.csv, paired.csv and
accuracy.png under the study's runs folder, plus the MI term's diagnostics
(``benchmarks/study_mi.py``) when a cell has one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from benchmarks.study_mi import diagnostics_frame, diagnostics_markdown, plot_diagnostics
from benchmarks.study_spec import Cell, Study, load_results
from mim4dd_jax import artifacts


def seed_accuracy(record: Mapping[str, Any], which: str, model: str) -> float | None:
    """A seed's accuracy (%): the mean over its evaluation models of its final/best evaluation."""
    entry = record.get(which, {}).get(model)
    return None if entry is None else 100.0 * float(entry["mean"])


def summary_frame(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]]):
    """A pandas DataFrame, one row per (cell, evaluation model)."""
    import numpy as np
    import pandas as pd

    rows = []
    for cell in study.cells:
        records = [results[(cell.name, s)] for s in cell.seeds if (cell.name, s) in results]
        models = sorted({m for r in records for m in r.get("final", {})}) or ["-"]
        for model in models:
            row: dict[str, Any] = {
                "cell": cell.name,
                "arg": cell.arg,
                "model": model,
                "seeds": f"{len(records)}/{len(cell.seeds)}",
            }
            for which in ("final", "best"):
                accs = [seed_accuracy(r, which, model) for r in records]
                accs = np.array([a for a in accs if a is not None])
                row[f"{which}_mean"] = accs.mean() if accs.size else math.nan
                row[f"{which}_std"] = accs.std(ddof=1) if accs.size > 1 else math.nan
            row["models"] = ",".join(sorted({str(r.get("num_models")) for r in records})) or "-"
            iters = sorted({int(r.get("iterations", 0)) for r in records})
            row["iterations"] = ",".join(map(str, iters)) or "-"
            for key, scale in (("s_per_iter", 1.0), ("peak_rss_bytes", 2.0**-30)):
                vals = [r[key] * scale for r in records if r.get(key) is not None]
                row[key if scale == 1 else "peak_rss_gib"] = np.mean(vals) if vals else math.nan
            walls = [r["wall_s"] / 60 for r in records if r.get("wall_s")]
            row["wall_min"] = np.mean(walls) if walls else math.nan
            # Older records lack it; s/iter and wall time compare only within one machine.
            machines = {_machine_name(r.get("results", {}).get("machine")) for r in records}
            row["machine"] = "; ".join(sorted(machines)) or "-"
            row["published"] = cell.published if cell.published is not None else math.nan
            row["final_minus_published"] = row["final_mean"] - row["published"]
            row["best_minus_published"] = row["best_mean"] - row["published"]
            row["published_note"] = cell.published_note
            rows.append(row)
    return pd.DataFrame(rows)


def _machine_name(machine: Mapping[str, Any] | None) -> str:
    """A short label of results.json's ``machine``: the devices off CPU, else the CPU x cores."""
    if not machine:
        return "-"
    if machine.get("backend") not in (None, "cpu"):
        return str(machine.get("devices"))
    return f"{machine.get('cpu')} x{machine.get('cores')}"


def differing_field(a: Cell, b: Cell) -> str | None:
    """The one override in which two cells of the same config and arg differ, else None."""
    if a.key() != b.key():
        return None
    keys = set(a.overrides) | set(b.overrides)
    diff = [k for k in sorted(keys) if a.overrides.get(k) != b.overrides.get(k)]
    return diff[0] if len(diff) == 1 else None


def _compared_pairs(study: Study) -> list[tuple[Cell, Cell, str, str, str]]:
    """(a, b, what differs, a's label, b's label) for every two cells that differ only in one
    ``compare`` field (labelled with its value), then every declared ``pairs`` entry not already
    among them (what differs: every differing override, joined by "+")."""
    by_name = {c.name: c for c in study.cells}
    out, seen = [], set()
    for i, a in enumerate(study.cells):
        for b in study.cells[i + 1 :]:
            name = differing_field(a, b)
            if name is not None and name in study.compare:
                label = lambda c, n=name: f"{c.name} ({n}={c.overrides.get(n)})"  # noqa: E731
                out.append((a, b, name, label(a), label(b)))
                seen.add((a.name, b.name))
    for a_name, b_name in study.pairs:
        if (a_name, b_name) in seen:
            continue
        a, b = by_name[a_name], by_name[b_name]
        keys = set(a.overrides) | set(b.overrides)
        diff = [k for k in sorted(keys) if a.overrides.get(k) != b.overrides.get(k)]
        out.append((a, b, "+".join(diff) or "-", a.name, b.name))
    return out


def _paired_stats(xa, xb) -> dict[str, float]:
    """b - a over paired seeds: the mean, its standard error and the 95% t-interval (scipy)."""
    import numpy as np
    from scipy import stats

    xa, xb = np.asarray(xa, float), np.asarray(xb, float)
    d = xb - xa
    lo = hi = se = math.nan
    if len(d) > 1:
        se = float(stats.sem(d))
        if se > 0:
            ci = stats.ttest_rel(xb, xa).confidence_interval(0.95)
            lo, hi = float(ci.low), float(ci.high)
        else:
            lo = hi = float(d.mean())
    return {
        "seeds": len(d),
        "mean_diff": float(d.mean()),
        "se": se,
        "ci95_low": lo,
        "ci95_high": hi,
    }


def paired_differences(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]]):
    """A DataFrame of b - a over the shared seeds for every pair of cells that differ only in
    one of ``study.compare``, and every declared ``pairs`` entry: mean, standard error, 95%
    t-interval (scipy), per model and for both the final and the best evaluation."""
    import pandas as pd

    rows = []
    for a, b, name, label_a, label_b in _compared_pairs(study):
        seeds = [s for s in a.seeds if (a.name, s) in results and (b.name, s) in results]
        if not seeds:
            continue
        models = set(results[(a.name, seeds[0])].get("final", {}))
        for model in sorted(models):
            for which in ("final", "best"):
                xa = [seed_accuracy(results[(a.name, s)], which, model) for s in seeds]
                xb = [seed_accuracy(results[(b.name, s)], which, model) for s in seeds]
                rows.append(
                    {
                        "field": name,
                        "a": label_a,
                        "b": label_b,
                        "model": model,
                        "which": which,
                        **_paired_stats(xa, xb),
                    }
                )
    return pd.DataFrame(rows)


def _curve(record: Mapping[str, Any], model: str) -> dict[int, float]:
    """{iteration: accuracy %} of one seed's evaluations of ``model``."""
    points = record.get("evaluations", {}).get(model, [])
    return {int(e["iteration"]): 100.0 * float(e["mean"]) for e in points}


def iteration_frame(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]]):
    """A DataFrame of accuracy (%) per (cell, model, evaluated iteration): mean and std over the
    seeds evaluated there (the convergence question: where each arm stands along the run)."""
    import numpy as np
    import pandas as pd

    rows = []
    for cell in study.cells:
        records = [results[(cell.name, s)] for s in cell.seeds if (cell.name, s) in results]
        models = sorted({m for r in records for m in r.get("evaluations", {})})
        for model in models:
            curves = [_curve(r, model) for r in records]
            for it in sorted(set().union(*curves)):
                accs = np.array([c[it] for c in curves if it in c])
                rows.append(
                    {
                        "cell": cell.name,
                        "model": model,
                        "iteration": it,
                        "seeds": len(accs),
                        "mean": float(accs.mean()),
                        "std": float(accs.std(ddof=1)) if len(accs) > 1 else math.nan,
                    }
                )
    return pd.DataFrame(rows)


def paired_by_iteration(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]]):
    """A DataFrame of b - a per declared pair, model and iteration that both cells evaluated on
    every shared seed: mean, standard error, 95% t-interval."""
    import pandas as pd

    by_name = {c.name: c for c in study.cells}
    rows = []
    for a_name, b_name in study.pairs:
        seeds = [
            s for s in by_name[a_name].seeds if (a_name, s) in results and (b_name, s) in results
        ]
        if not seeds:
            continue
        records = [results[(n, s)] for n in (a_name, b_name) for s in seeds]
        models = set.intersection(*(set(r.get("evaluations", {})) for r in records))
        for model in sorted(models):
            ca = [_curve(results[(a_name, s)], model) for s in seeds]
            cb = [_curve(results[(b_name, s)], model) for s in seeds]
            shared = set.intersection(*(set(c) for c in ca + cb))
            for it in sorted(shared):
                rows.append(
                    {"a": a_name, "b": b_name, "model": model, "iteration": it}
                    | _paired_stats([c[it] for c in ca], [c[it] for c in cb])
                )
    return pd.DataFrame(rows)


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def _num(value: float, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt % value


def markdown(study: Study, table, diffs) -> str:
    """The study's tables as markdown (accuracies in %)."""
    lines = [f"# Study `{study.name}`", ""]
    if study.description:
        lines += [study.description.strip(), ""]
    lines += [
        "Accuracy (%) over seeds (each seed = the mean over its evaluation models); "
        "final = last evaluation, best = best evaluation over the run.",
        "",
        "| cell | arg | model | seeds | models/seed | iterations | final | best | published "
        "| final − pub | best − pub | s/iter | peak RSS GiB | wall min/seed | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.to_dict("records"):
        lines.append(
            f"| {r['cell']} | {r['arg']} | {r['model']} | {r['seeds']} | {r['models']} | "
            f"{r['iterations']} | {_pm(r['final_mean'], r['final_std'])} | "
            f"{_pm(r['best_mean'], r['best_std'])} | {_num(r['published'], '%.1f')} | "
            f"{_num(r['final_minus_published'], '%+.2f')} | "
            f"{_num(r['best_minus_published'], '%+.2f')} | {_num(r['s_per_iter'], '%.3f')} | "
            f"{_num(r['peak_rss_gib'], '%.2f')} | {_num(r['wall_min'], '%.1f')} | "
            f"{r['machine']} |"
        )
    if len(diffs):
        lines += [
            "",
            "Paired differences b − a (accuracy points) over the shared seeds, 95% t-interval:",
            "",
            "| field | a | b | model | eval | seeds | mean | SE | 95% CI |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in diffs.to_dict("records"):
            ci = (
                "-"
                if math.isnan(r["ci95_low"])
                else f"[{r['ci95_low']:+.2f}, {r['ci95_high']:+.2f}]"
            )
            lines.append(
                f"| {r['field']} | {r['a']} | {r['b']} | {r['model']} | {r['which']} | "
                f"{r['seeds']} | {r['mean_diff']:+.2f} | {_num(r['se'], '%.2f')} | {ci} |"
            )
    return "\n".join(lines) + "\n"


def _ci(r: Mapping[str, Any]) -> str:
    if math.isnan(r["ci95_low"]):
        return "-"
    return f"[{r['ci95_low']:+.2f}, {r['ci95_high']:+.2f}]"


def iterations_markdown(iters, paired) -> str:
    """Accuracy (%) by evaluated iteration, one row per (cell, model) (mean ± std (seeds)), and
    the declared pairs' b − a at each iteration; "" when no cell evaluated more than once and no
    pair has a shared evaluation."""
    multi = len(iters) and (iters.groupby(["cell", "model"])["iteration"].nunique() > 1).any()
    if not multi and not len(paired):
        return ""
    lines = []
    if len(iters):
        steps = sorted(iters["iteration"].unique())
        lines += [
            "",
            "Accuracy (%) by iteration, mean ± std (seeds) over the seeds evaluated there:",
            "",
            "| cell | model | " + " | ".join(str(s) for s in steps) + " |",
            "|---|---|" + "---|" * len(steps),
        ]
        for (cell, model), group in iters.groupby(["cell", "model"], sort=False):
            at = {r["iteration"]: r for r in group.to_dict("records")}
            cols = []
            for step in steps:
                r = at.get(step)
                if r is None:
                    cols.append("-")
                elif r["seeds"] > 1:
                    cols.append(f"{_pm(r['mean'], r['std'])} ({r['seeds']})")
                else:
                    cols.append(f"{r['mean']:.2f}")
            lines.append(f"| {cell} | {model} | " + " | ".join(cols) + " |")
    if len(paired):
        lines += [
            "",
            "Declared pairs, b − a (accuracy points) at each iteration both evaluated on the "
            "shared seeds, 95% t-interval:",
            "",
            "| a | b | model | iteration | seeds | mean | SE | 95% CI |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in paired.to_dict("records"):
            lines.append(
                f"| {r['a']} | {r['b']} | {r['model']} | {r['iteration']} | {r['seeds']} | "
                f"{r['mean_diff']:+.2f} | {_num(r['se'], '%.2f')} | {_ci(r)} |"
            )
    return "\n".join(lines) + "\n"


def plot(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]], path: str) -> None:
    """Accuracy against iteration: one line per cell (first evaluation model), ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cell in study.cells:
        records = [results[(cell.name, s)] for s in cell.seeds if (cell.name, s) in results]
        curves = []
        for r in records:
            evals = r.get("evaluations", {})
            if evals:
                curves.append(_curve(r, sorted(evals)[0]))
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        acc = np.array([[c[s] for s in steps] for c in curves])
        mean, std = acc.mean(0), acc.std(0)
        (line,) = ax.plot(steps, mean, marker="o", ms=3, label=f"{cell.name} (n={len(curves)})")
        if len(curves) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("iteration")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(study.name)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    with artifacts.atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def report(study: Study) -> str:
    """Writes table.md, table.csv, paired.csv, iterations.csv (paired_iterations.csv with declared
    pairs) and accuracy.png under the study's runs folder (and, when a cell has an MI term,
    diagnostics.png and the diagnostics table in table.md); returns the markdown."""
    results = load_results(study)
    table = summary_frame(study, results)
    diffs = paired_differences(study, results)
    os.makedirs(study.runs_dir, exist_ok=True)
    text = markdown(study, table, diffs)
    with artifacts.atomic_write(os.path.join(study.runs_dir, "table.csv"), "w") as f:
        table.to_csv(f, index=False)
    with artifacts.atomic_write(os.path.join(study.runs_dir, "paired.csv"), "w") as f:
        diffs.to_csv(f, index=False)
    iters, paired = iteration_frame(study, results), paired_by_iteration(study, results)
    text += iterations_markdown(iters, paired)
    with artifacts.atomic_write(os.path.join(study.runs_dir, "iterations.csv"), "w") as f:
        iters.to_csv(f, index=False)
    if len(paired):
        with artifacts.atomic_write(
            os.path.join(study.runs_dir, "paired_iterations.csv"), "w"
        ) as f:
            paired.to_csv(f, index=False)
    plot(study, results, os.path.join(study.runs_dir, "accuracy.png"))
    diag = diagnostics_frame(study, results)
    if len(diag):
        plot_diagnostics(study, results, os.path.join(study.runs_dir, "diagnostics.png"))
        text += diagnostics_markdown(diag)
    with artifacts.atomic_write(os.path.join(study.runs_dir, "table.md"), "w") as f:
        f.write(text)
    return text
