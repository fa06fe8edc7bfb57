"""The paper's CIFAR ablations (Tables 1, 3, 5 and 6) as entries a run can match, and their
markdown tables. Only runs trained with the paper's CIFAR augmentation match."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from ran_bench.markdown import table
from ran_bench.paper import load_table, load_table_text
from ran_bench.report.cells import DASH, NOT_RUN, diff, err_cell, number, paper_cell, run_cell
from ran_bench.report.runs import MODEL_OPTION_DEFAULTS, Run

CIFAR_TEST_SIZE = 32
CIFAR_RECIPE = "4-pixel padding, random 32x32 crop, horizontal flip"


@dataclass
class Entry:
    """One cell of a paper table that a run can reproduce."""

    labels: list[str]  # the row's identifying columns
    err: str  # the paper's error in percent, as printed
    match: Callable[[Run], bool]
    params_m: str = ""  # the paper's params (1e6), as printed; "" where not a column


@dataclass
class Section:
    """One CIFAR table of the paper: its heading, a note under it, its identifying columns and entries."""

    title: str
    note: str
    label_headers: list[str]
    entries: list[Entry]
    with_params: bool = False


def _cifar_match(model: str, dataset: str = "cifar10", noise: float = 0.0, **options) -> Callable[[Run], bool]:
    """A run of `model` on `dataset` with these options and label noise, trained with the paper's
    CIFAR augmentation (a run with the ImageNet transforms is not the paper's recipe)."""
    want = {**MODEL_OPTION_DEFAULTS, **options}

    def match(run: Run) -> bool:
        return (run.model == model and run.dataset == dataset and run.options == want
                and math.isclose(run.label_noise, noise, abs_tol=1e-9) and run.augmentation == "cifar")

    return match


def cifar_sections() -> list[Section]:
    """The CIFAR tables of the paper as entries a run can match (model, data, options, noise)."""
    t1 = Section(
        "Table 1: attention type (CIFAR-10, Attention-56)",
        "Mixed (f1, sigmoid), channel (f2, L2 normalisation over channels) and spatial (f3, "
        "per-channel normalisation then sigmoid) attention; `model.options.attention` in the run's config.",
        ["network", "attention"],
        [Entry([r["network"], r["attention"]], text["top1_err"],
               _cifar_match(r["model"], r["dataset"], attention=r["attention"]))
         for r, text in zip(load_table("table1_attention_type"), load_table_text("table1_attention_type"))],
    )
    t3 = Section(
        "Table 3: attention residual learning (ARL) vs naive attention learning (NAL), CIFAR-10",
        "ARL: (1 + M) * T; NAL: M * T; `model.options.residual_attention` true or false in the run's config.",
        ["network", "learning"],
        [Entry([r["network"], kind], text[f"{kind.lower()}_err"],
               _cifar_match(r["model"], r["dataset"], residual_attention=kind == "ARL"))
         for r, text in zip(load_table("table3_arl_nal"), load_table_text("table3_arl_nal"))
         for kind in ("ARL", "NAL")],
    )
    t5 = Section(
        "Table 5: noisy labels (CIFAR-10)",
        "A fraction of the training labels changed to a different class (`data.label_noise`).",
        ["label noise", "network"],
        [Entry([f"{r['label_noise']:.0%}", network], text[column], _cifar_match(model, noise=r["label_noise"]))
         for r, text in zip(load_table("table5_label_noise"), load_table_text("table5_label_noise"))
         for network, model, column in (("ResNet-164", "cifar_resnet164", "resnet164_err"),
                                        ("Attention-92", "cifar_attention92", "attention92_err"))],
    )
    t6 = Section(
        "Table 6: CIFAR-10 and CIFAR-100",
        "Rows without a ran-bench model (ResNet-1001, WRN) can only say not run.",
        ["network", "data set"],
        [Entry([r["network"], name], text[f"{dataset}_err"],
               _cifar_match(r["model"], dataset) if r["model"] else (lambda run: False), text["params_m"])
         for r, text in zip(load_table("table6_cifar"), load_table_text("table6_cifar"))
         for dataset, name in (("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100"))],
        with_params=True,
    )
    return [t1, t3, t5, t6]


def section_table(section: Section, runs: list[Run]) -> tuple[list[str], list[Run]]:
    """The markdown table of one CIFAR section (a row per entry and run, "not run" rows for entries
    without one) and the runs it compared with the paper."""
    headers = list(section.label_headers)
    if section.with_params:
        headers += ["params M (paper)", "params M (measured)", "Δ params M"]
    headers += ["top-1 err % (paper)", "top-1 err % (measured)", "Δ top-1", "run"]
    rows, matched = [], []
    for entry in section.entries:
        entry_runs = [r for r in runs if entry.match(r)]
        if not entry_runs:
            params = [paper_cell(entry.params_m), NOT_RUN, DASH] if section.with_params else []
            rows.append(entry.labels + params + [paper_cell(entry.err), NOT_RUN, DASH, NOT_RUN])
        for run in entry_runs:
            matched.append(run)
            params = []
            if section.with_params:
                params_m = run.results.params / 1e6
                params = [paper_cell(entry.params_m), f"{params_m:.2f}", diff(params_m, number(entry.params_m))]
            ev = run.results.evaluation(CIFAR_TEST_SIZE)
            if ev is None:
                errs = [paper_cell(entry.err), f"not evaluated at {CIFAR_TEST_SIZE}", DASH]
            else:
                errs = [paper_cell(entry.err), err_cell(ev.top1_err, ev, run.dataset),
                        diff(ev.top1_err, number(entry.err))]
            rows.append(entry.labels + params + errs + [run_cell(run)])
    return table(headers, rows), matched
