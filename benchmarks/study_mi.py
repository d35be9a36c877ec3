"""The MI term's diagnostics of a study: per cell with an MI term, a table of the gradient
ratio, the gradient cosine, lambda and the MI estimate (``diagnostics_frame``,
``diagnostics_markdown``) and their curves against the step (``plot_diagnostics``,
``diagnostics.png``), all from the per-step ``trace`` of the committed results (its fields:
``TRACE_FIELDS`` in ``benchmarks/study.py``). ``benchmarks/study_report.py`` adds them to the
study's tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from benchmarks.study_spec import Cell, Study
from mim4dd_jax import artifacts


def diagnostics_frame(study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]]):
    """Per cell with an MI term: the mean over logged steps (and seeds) of grad_ratio, grad_cos
    and mi_lambda, and the MI estimate (nats, summed over layers) at the first and last log."""
    import pandas as pd

    rows = []
    for cell in study.cells:
        traces = _mi_traces(cell, results)
        if not traces:
            continue
        steps = [r for t in traces for r in t]
        rows.append(
            {
                "cell": cell.name,
                "seeds": len(traces),
                "grad_ratio": _mean_of(steps, "grad_ratio"),
                "grad_cos": _mean_of(steps, "grad_cos"),
                "mi_lambda": _mean_of(steps, "mi_lambda"),
                "mi_first": sum(sum(t[0]["mi"]) for t in traces) / len(traces),
                "mi_last": sum(sum(t[-1]["mi"]) for t in traces) / len(traces),
            }
        )
    return pd.DataFrame(rows)


def _mi_traces(
    cell: Cell, results: Mapping[tuple[str, int], Mapping[str, Any]]
) -> list[list[dict[str, Any]]]:
    """The traces of the cell's collected seeds that log an MI term."""
    traces = [
        results[(cell.name, s)].get("trace") or [] for s in cell.seeds if (cell.name, s) in results
    ]
    return [t for t in traces if t and "mi" in t[-1]]


def _mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def diagnostics_markdown(diag) -> str:
    """The rows of :func:`diagnostics_frame` as a markdown section (appended to table.md)."""
    text = "\n### MI term diagnostics (mean over logged steps)\n\n"
    text += "| cell | seeds | grad_ratio | grad_cos | lambda | MI first | MI last |\n"
    text += "|---|---|---|---|---|---|---|\n"
    for r in diag.to_dict("records"):
        text += (
            f"| {r['cell']} | {r['seeds']} | {r['grad_ratio']:.3g} | {r['grad_cos']:+.3f} | "
            f"{r['mi_lambda']:.3g} | {r['mi_first']:.3f} | {r['mi_last']:.3f} |\n"
        )
    return text


def plot_diagnostics(
    study: Study, results: Mapping[tuple[str, int], Mapping[str, Any]], path: str
) -> bool:
    """MI estimate (summed over layers), grad_cos and mi_lambda against the step, one line per
    cell with an MI term (seed mean). False (nothing written) when no cell has one."""
    import matplotlib

    matplotlib.use("Agg")
    import numpy as np
    from matplotlib import pyplot as plt

    panels = (("mi", "MI estimate (nats, sum over layers)"), ("grad_cos", "cos(g_base, g_mi)"))
    panels += (("mi_lambda", "lambda"),)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    # A study has more MI cells than a 10-colour cycle: 20 colours, then a second line style.
    colours = plt.get_cmap("tab20").colors
    drawn = 0
    for cell in study.cells:
        traces = _mi_traces(cell, results)
        if not traces:
            continue
        steps = sorted(set.intersection(*({r["step"] for r in t} for t in traces)))
        style = dict(color=colours[drawn % 20], linestyle=("-", "--")[drawn // 20 % 2])
        for ax, (key, label) in zip(axes, panels, strict=True):
            by_step = [{r["step"]: r[key] for r in t} for t in traces]
            values = np.array([[np.sum(b[s]) for s in steps] for b in by_step]).mean(0)
            ax.plot(steps, values, label=cell.name, **style)
            ax.set_xlabel("iteration")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        drawn += 1
    if drawn:
        # Loose bounds (NCE at a low temperature) reach -1e4 nats while the useful ones sit
        # in [0, 3 log K]: linear near zero, logarithmic beyond, so both stay readable.
        axes[0].set_yscale("symlog", linthresh=10.0)
        axes[2].set_yscale("log")
        fig.legend(
            *axes[0].get_legend_handles_labels(),
            loc="upper center",
            ncol=4,
            fontsize=7,
            bbox_to_anchor=(0.5, 0.0),
        )
        with artifacts.atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return drawn > 0
