"""Table cells of the report: paper numbers as printed, differences, shares of a schedule, and a
run's label marked when it is partial or short of the paper's schedule."""

from __future__ import annotations

import math

from ran_bench.report.runs import FULL_TEST_IMAGES, MODEL_OPTION_DEFAULTS, Run
from ran_bench.results import Evaluation

NOT_RUN = "not run"
DASH = "—"


def paper_cell(text: str) -> str:
    """A paper number as printed in the paper's table (the CSV's string, so "20.50" keeps its
    digits), or a dash where it gives none."""
    return text or DASH


def number(text: str) -> float | None:
    return float(text) if text else None


def diff(measured: float | None, paper: float | None) -> str:
    if measured is None or paper is None:
        return DASH
    return f"{measured - paper:+.2f}"


def percent(fraction: float) -> str:
    """Three significant digits, but a fraction below 1 never reads "100%": it gets more digits
    (99.96%), so a run short of its schedule cannot pass for a whole one."""
    value = 100 * fraction
    if fraction >= 1:
        return f"{value:,.0f}%"
    for digits in range(3, 12):
        text = f"{value:.{digits}g}"
        if float(text) < 100:
            return f"{text}%"
    return f"{math.floor(value * 1e9) / 1e9:.9f}%"


def duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def run_cell(run: Run) -> str:
    """The run's label, marked when it stopped before the end of its own schedule (partial) and
    when it saw fewer images than the paper's schedule: a 1000-step run is not a reproduction."""
    marks = ["partial"] if run.results.partial else []
    share = run.schedule_share
    if share is not None and share < 1:
        marks.append(f"{percent(share)} of the paper's schedule")
    return f"{run.label} ({', '.join(marks)})" if marks else run.label


def err_cell(err: float, evaluation: Evaluation, dataset: str) -> str:
    """A measured error, with the image count when the evaluation did not cover the whole test set."""
    full = FULL_TEST_IMAGES.get(dataset)
    if full is None or evaluation.num_samples == full:
        return f"{err:.2f}"
    return f"{err:.2f} ({evaluation.num_samples:,} of {full:,} images)"


def options_text(run: Run) -> str:
    """The run's model options that differ from the paper's default, and its label noise, in words."""
    opts = run.non_default_options()
    text = []
    if "attention" in opts:
        text.append(f"{opts['attention']} attention")
    if "residual_attention" in opts:
        text.append("NAL (M*T)")
    if "mask" in opts:
        text.append(f"{opts['mask']} mask")
    text += [f"{k}={v}" for k, v in opts.items() if k not in MODEL_OPTION_DEFAULTS]
    if run.label_noise:
        text.append(f"label noise {run.label_noise:g}")
    return ", ".join(text) or DASH
