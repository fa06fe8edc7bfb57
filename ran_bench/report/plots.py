"""The report's PNG plots: training curves of every run, and Table 7's error against parameters
and multiply-adds with the measured points. matplotlib is imported only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path

from ran_bench.paper import load_table
from ran_bench.report.cells import run_cell
from ran_bench.report.runs import Run


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(runs: list[Run], path: Path) -> bool:
    """Training loss and validation top-1 error against steps, one line per run (and test size)."""
    logged = [r for r in runs if r.train_metrics or r.eval_metrics]
    if not logged:
        return False
    plt = _pyplot()
    fig, (ax_loss, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    for run in logged:
        if run.train_metrics:
            ax_loss.plot([m["step"] for m in run.train_metrics], [m["loss"] for m in run.train_metrics],
                         linewidth=1, label=run.label)
        for size in sorted({m["size"] for m in run.eval_metrics}):
            points = [m for m in run.eval_metrics if m["size"] == size]
            ax_err.plot([m["step"] for m in points], [m["top1_err"] for m in points], marker="o",
                        markersize=3, label=f"{run.label} @{size}")
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax_err.set(xlabel="step", ylabel="top-1 error %", title="Validation top-1 error")
    for ax in (ax_loss, ax_err):
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_table7(matched: list[tuple[dict, Run]], path: Path) -> None:
    """Top-1 error against parameters and against multiply-adds: the paper's Table 7 points, and
    the measured points of the runs compared with a row (joined to their paper point, labelled
    like their table cell: partial, share of the paper's schedule)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    rows = [r for r in load_table("table7_imagenet") if r["params_m"] is not None]
    for ax, key, measured_of, xlabel in (
        (axes[0], "params_m", lambda res: res.params / 1e6, "parameters (millions)"),
        (axes[1], "flops_g", lambda res: res.macs / 1e9 if res.macs_input_size == 224 else None,
         "multiply-adds at 224x224 (G)"),
    ):
        ax.scatter([r[key] for r in rows], [r["top1_err"] for r in rows], color="tab:blue",
                   label="paper (Table 7)", zorder=3)
        for r in rows:
            ax.annotate(r["network"], (r[key], r["top1_err"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        first = True
        for row, run in matched:
            ev = run.results.evaluation(row["test_size"])
            x = measured_of(run.results)
            if ev is None or x is None:
                continue
            ax.scatter([x], [ev.top1_err], color="tab:orange", marker="x", zorder=4,
                       label="measured (runs in this report)" if first else None)
            first = False
            if row[key] is not None:
                ax.plot([row[key], x], [row["top1_err"], ev.top1_err], color="tab:orange",
                        linestyle="--", linewidth=0.8)
            ax.annotate(run_cell(run), (x, ev.top1_err),
                        fontsize=6, color="tab:orange", xytext=(3, -8), textcoords="offset points")
        ax.set(xlabel=xlabel, ylabel="top-1 error % (single crop, row's test size)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("Top-1 error vs parameters")
    axes[1].set_title("Top-1 error vs multiply-adds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
