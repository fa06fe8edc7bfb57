"""`ran-bench report`: a markdown report of runs beside the paper's tables, with plots.

The report reproduces Table 7 (ImageNet-1K) row by row and, when CIFAR runs are given, the
CIFAR ablations (Tables 1, 3, 5 and 6). Every measured number comes from a run directory: params,
multiply-adds and errors from `results.json`, curves from `metrics.jsonl`, the model's
ablation options from `config.yaml`. A row without a run says "not run"; nothing is filled in
or estimated. How each measured number was obtained (data set, how much of the schedule, world
size, device, precision, GPU-hours) is tabled beside it, and a run's cell in a paper table says
when it stopped early (partial) or trained on fewer images than the paper's schedule (the share
of it), or was evaluated on fewer than all the test images, so a partial or short run cannot be
mistaken for a reproduction. CIFAR rows take only runs trained with the paper's CIFAR
augmentation (`data.augmentation: cifar`).

Plots are PNG files written next to the markdown and linked with relative paths.

A "to reproduce" table gives, for every Table 7 row, the paper's schedule in images and what it
costs (hours on one device, wall time on 8 and 32) by the `bench train` rows of results.csv
(`--bench-csv`, else `ran_bench.bench.rates.results_csv()`), naming the row each figure comes
from; "not measured" where none exists.

This module assembles the report; its parts are `runs` (reading run directories), `cells`
(formatting table cells), `tables` (Table 7, other runs, provenance, throughput), `cost` (the "to
reproduce" table), `cifar` (the CIFAR tables) and `plots`.
"""

from __future__ import annotations

import argparse
import os
from datetime import datetime, timezone
from pathlib import Path

from ran_bench.bench.rates import read_rows, results_csv
from ran_bench.fileio import REPO
from ran_bench.report import cost
from ran_bench.report.cifar import CIFAR_RECIPE, Section, cifar_sections, section_table
from ran_bench.report.plots import plot_table7, plot_training
from ran_bench.report.runs import ReportError, Run, load_run, unique_labels
from ran_bench.report.tables import THROUGHPUT_DEFINITIONS, other_runs, provenance, table7, throughput

__all__ = ["ReportError", "Run", "cifar_sections", "load_run", "main", "write_report"]


def write_report(run_dirs: list[str | os.PathLike], output: str | os.PathLike,
                 bench_csv: str | os.PathLike | None = None) -> Path:
    """Write the markdown report of `run_dirs` to `output` and its PNG plots next to it; the cost
    of each Table 7 row comes from `bench_csv` (default: `ran_bench.bench.rates.results_csv()`)."""
    runs = [load_run(d) for d in run_dirs]
    unique_labels(runs)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)

    table7_lines, matched7 = table7(runs)
    cifar = any(r.dataset in ("cifar10", "cifar100") for r in runs)
    sections = [(section, *section_table(section, runs)) for section in cifar_sections()] if cifar else []
    in_cifar = {id(r) for _, _, matched in sections for r in matched}
    others = [r for r in runs if id(r) not in {id(run) for _, run in matched7} | in_cifar]

    lines = _introduction(output.stem, runs)
    lines += [f"Runs: {len(matched7)} compared with a Table 7 row, {len(in_cifar)} with a CIFAR table row, "
              f"{len(others)} match no paper row (listed under other runs, not compared with the paper).", ""]
    lines += _table7_section(table7_lines, matched7, output)
    lines += _cost_section(bench_csv)
    lines += _cifar_section(sections)
    if others:
        lines += ["## Other runs", "",
                  "Runs whose model, data set or options match no row of the paper's tables; "
                  "their numbers are not comparable with the paper's.", "", *other_runs(others), ""]
    lines += _provenance_and_throughput(runs)
    lines += _curves_section(runs, output)
    output.write_text("\n".join(lines))
    return output


def _introduction(stem: str, runs: list[Run]) -> list[str]:
    return [f"# ran-bench report: {stem}", "",
            f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `ran-bench report` from "
            f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'}. Paper: Wang et al., "
            "\"Residual Attention Network for Image Classification\", CVPR 2017 (numbers in "
            "`reports/paper/`). Measured numbers come only from the runs' `results.json`; a row "
            "without a run says \"not run\"; a run's cell says \"partial\" when it stopped before the end of "
            "its own schedule and gives the share of the paper's schedule (images seen) when it trained "
            "on fewer images than the paper. CIFAR rows take only runs trained with the paper's CIFAR "
            f"augmentation ({CIFAR_RECIPE}). Δ = measured − paper; error differences are in percentage "
            "points.", ""]


def _table7_section(table: list[str], matched: list[tuple[dict, Run]], output: Path) -> list[str]:
    """The Table 7 heading, table and plot (written next to `output`)."""
    plot = output.with_name(f"{output.stem}_table7.png")
    plot_table7(matched, plot)
    return ["## Table 7: ImageNet-1K, single-crop validation error", "",
            "Measured params and multiply-adds (MACs) are counted from the model by the run; the paper "
            "counts multiply-adds at 224x224 for every row, so a count at another size is shown with "
            "its size and not differenced. Errors are the run's evaluation at the row's test size.", "",
            *table, "",
            f"![Top-1 error against parameters and multiply-adds]({plot.name})", "",
            "Blue: the paper's Table 7 (rows with published params and FLOPs); orange crosses: "
            "measured runs, joined to their paper point by a dashed line and labelled like their "
            "table cell (partial, share of the paper's schedule).", ""]


def _cost_section(bench_csv: str | os.PathLike | None) -> list[str]:
    """What each Table 7 row costs to reproduce, from the recorded `bench train` rows."""
    path = Path(bench_csv) if bench_csv is not None else results_csv()
    rows, problem = read_rows(path)
    shown = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path  # no home paths
    return ["## To reproduce: what each Table 7 row costs", "", cost.note(rows, problem, shown), "",
            *cost.table(rows, problem), ""]


def _cifar_section(sections: list[tuple[Section, list[str], list[Run]]]) -> list[str]:
    """The CIFAR tables and the note on Table 4; nothing when no CIFAR run was given."""
    if not sections:
        return []
    lines = []
    for section, table, _ in sections:
        lines += [f"## {section.title}", "", section.note, "", *table, ""]
    return lines + ["Table 4 (mask structure) is not reproduced as a table: its numbers are not in "
                    "`reports/paper/`. A blog summary of the paper (not the paper itself) states the "
                    "encoder-decoder (bottom-up top-down) mask is about 0.94 points better than local "
                    "convolutions on CIFAR-10; runs with `model.options.mask: local_conv` are listed under "
                    "other runs.", ""]


def _provenance_and_throughput(runs: list[Run]) -> list[str]:
    return ["## How each measured number was obtained", "",
            "Steps are optimizer steps of the run's configured schedule; the paper's schedule is "
            "530k iterations at batch 256 on ImageNet and 160k at batch 64 on CIFAR. "
            f"{THROUGHPUT_DEFINITIONS['gpu_hours']}", "", *provenance(runs), "",
            "## Throughput", "", "As recorded by each run in results.json:", "",
            *(f"- {THROUGHPUT_DEFINITIONS[key]}" for key in ("train", "per_device", "infer")), "",
            *throughput(runs), ""]


def _curves_section(runs: list[Run], output: Path) -> list[str]:
    """The training curves plot (written next to `output`), or why there is none."""
    plot = output.with_name(f"{output.stem}_training.png")
    lines = ["## Training curves", ""]
    if not plot_training(runs, plot):
        return lines + ["None of the runs has a metrics.jsonl.", ""]
    lines += [f"![Training loss and top-1 error against steps]({plot.name})", ""]
    missing = [r.label for r in runs if not (r.train_metrics or r.eval_metrics)]
    if missing:
        lines += [f"No metrics.jsonl for: {', '.join(missing)}.", ""]
    return lines


def main(args: argparse.Namespace) -> int:
    path = write_report(args.run_dirs, args.output, args.bench_csv)  # bad runs raise UserErrors: exit 2
    print(f"wrote {path} and its plots in {path.parent}")
    return 0
