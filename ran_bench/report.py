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
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import yaml

from ran_bench.errors import UserError
from ran_bench.paper import load_table, load_table_text
from ran_bench.results import Results, load_results

# The paper's schedules in images (iterations x batch), to say how much of them a run did.
# ImageNet: 530k iterations at batch 256; CIFAR: 160k iterations at batch 64.
PAPER_SCHEDULE_IMAGES = {"imagenet": 530_000 * 256, "cifar10": 160_000 * 64, "cifar100": 160_000 * 64}
PAPER_DATASET_CLASSES = {"imagenet": 1000, "cifar10": 10, "cifar100": 100}
# Images of the test sets the paper reports on: an evaluation on fewer is flagged.
FULL_TEST_IMAGES = {"imagenet": 50_000, "cifar10": 10_000, "cifar100": 10_000}
CIFAR_TEST_SIZE = 32
CIFAR_RECIPE = "4-pixel padding, random 32x32 crop, horizontal flip"

# Constructor defaults of the attention models: a config that does not set an option gets these.
MODEL_OPTION_DEFAULTS = {"attention": "mixed", "residual_attention": True, "mask": "encoder_decoder"}
MODEL_OPTION_CHOICES = {
    "attention": ("mixed", "channel", "spatial"),
    "residual_attention": (True, False),
    "mask": ("encoder_decoder", "local_conv"),
}

# What the recorded speed and cost figures measure (the trainer's definitions in results.json).
THROUGHPUT_DEFINITIONS = {
    "train": "train images/s: training images of all processes together divided by the seconds spent in "
             "training steps, summed over all segments of the run (one per launch or requeue); "
             "evaluations, checkpoints, start-up and steps redone after a kill are not counted.",
    "per_device": "train images/s per device: the same divided by the world size (of the last segment).",
    "infer": "inference images/s: validation images per second of the trainer's final evaluation at the "
             "run's first test size, the evaluation pass only (which includes building a DALI pipeline or "
             "starting torchvision's workers), all training processes together; "
             "a dash when `ran-bench eval` wrote the record.",
    "gpu_hours": "Wall time: launch to last checkpoint, summed over segments. GPU-hours: on CUDA, each "
                 "segment's processes (one GPU each) x its wall time, summed over segments; 0 on CPU.",
}

NOT_RUN = "not run"
DASH = "—"


class ReportError(ValueError, UserError):
    """A run directory that cannot be reported: a missing or malformed file, named in the message."""


# --------------------------------------------------------------------------------------------
# Reading run directories


@dataclass
class Run:
    """One run directory: its results, resolved config and metrics log."""

    path: Path
    label: str
    results: Results
    options: dict  # model.options of the config, MODEL_OPTION_DEFAULTS filled in
    train_metrics: list[dict]
    eval_metrics: list[dict]

    @property
    def model(self) -> str:
        return self.results.model

    @property
    def dataset(self) -> str:
        """Data set name normalised for matching: "imagenet", "cifar10" or "cifar100" when the name
        and the number of classes say so; otherwise the name as given, with the classes if the
        name alone would pass for one of the paper's data sets (a 100-class ImageNet subset)."""
        raw, classes = self.results.dataset, self.results.num_classes
        name = raw.lower().replace("-", "").replace("_", "")
        if name.startswith("imagenet"):
            name = "imagenet"
        if name in PAPER_DATASET_CLASSES:
            return name if classes == PAPER_DATASET_CLASSES[name] else f"{raw} ({classes} classes)"
        return raw

    @property
    def label_noise(self) -> float:
        return self.results.label_noise

    @property
    def augmentation(self) -> str:
        """The training augmentation (`data.augmentation`); results.json files written before the
        field existed were all trained with the ImageNet transforms."""
        return getattr(self.results, "augmentation", "imagenet")

    @property
    def schedule_share(self) -> float | None:
        """Images seen as a share of the paper's schedule on the run's data set (None off the
        paper's data sets)."""
        paper_images = PAPER_SCHEDULE_IMAGES.get(self.dataset)
        return None if paper_images is None else self.results.images_seen / paper_images

    @property
    def status(self) -> str:
        return "partial" if self.results.partial else "complete"

    def non_default_options(self) -> dict:
        """Constructor options that change the model from the paper's default (ARL, mixed
        attention, encoder-decoder mask), including any other option such as p, t, r."""
        return {k: v for k, v in self.options.items() if k not in MODEL_OPTION_DEFAULTS or v != MODEL_OPTION_DEFAULTS[k]}


def load_run(path: str | os.PathLike) -> Run:
    """Read a run directory (or its results.json); errors name the file and what is wrong."""
    path = Path(path)
    if path.is_file() and path.name == "results.json":
        path = path.parent
    if not path.is_dir():
        raise ReportError(f"{path}: not a run directory (expected the --run-dir of `ran-bench train`)")
    results = load_results(path / "results.json")
    options = _model_options(path / "config.yaml", results.model)
    train, evals = _load_metrics(path / "metrics.jsonl")
    return Run(path, path.name, results, options, train, evals)


def _model_options(config_path: Path, model: str) -> dict:
    """The constructor options the run's model was built with (`model.options` of its resolved
    config.yaml). An ablation option the config does not set is the model's constructor default,
    so models without options (the baselines) read as the paper's defaults.
    """
    if not config_path.is_file():
        raise ReportError(f"{config_path}: not found; `ran-bench train` writes the resolved config "
                          "there, and the report needs it to tell which ablation a run belongs to")
    try:
        config = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{config_path}: not valid YAML ({e})") from None
    if not isinstance(config, dict):
        raise ReportError(f"{config_path}: expected a mapping of config sections, got {type(config).__name__}")
    section = config.get("model", {})
    if not isinstance(section, dict):
        raise ReportError(f"{config_path}: 'model' must be a mapping, got {section!r}")
    name = section.get("name")
    if name is not None and name != model:
        raise ReportError(f"{config_path}: model.name is {name!r} but results.json says {model!r}; "
                          "the run directory mixes files of two runs")
    values = section.get("options") or {}
    if not isinstance(values, dict):
        raise ReportError(f"{config_path}: model.options must be a mapping, got {values!r}")
    options = {**MODEL_OPTION_DEFAULTS, **values}
    for key, choices in MODEL_OPTION_CHOICES.items():
        value = options[key]
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ReportError(f"{config_path}: model.options.{key} is {value!r}; valid values: {list(choices)}")
    return options


def _load_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Training and evaluation lines of metrics.jsonl, each sorted by step (empty without a log).

    A run killed while appending can leave a truncated last line; that line is ignored. Any other
    unreadable line is an error naming the file and line.
    """
    if not path.is_file():
        return [], []
    lines = path.read_text().splitlines()
    required = {"train": ("step", "loss"), "eval": ("step", "size", "top1_err")}
    train, evals = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                continue
            raise ReportError(f"{path}:{number}: not valid JSON ({e})") from None
        if not isinstance(record, dict) or record.get("kind") not in required:
            raise ReportError(f"{path}:{number}: expected an object with kind 'train' or 'eval'")
        missing = [k for k in required[record["kind"]] if not isinstance(record.get(k), (int, float))]
        if missing:
            raise ReportError(f"{path}:{number}: {record['kind']} line lacks numeric {missing}")
        (train if record["kind"] == "train" else evals).append(record)
    return sorted(train, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def _unique_labels(runs: list[Run]) -> None:
    """Label runs by directory name, adding parent folders where two names collide."""
    for depth in range(1, 8):
        labels = ["/".join(r.path.resolve().parts[-depth:]) for r in runs]
        if len(set(labels)) == len(labels):
            break
    for run, label in zip(runs, labels):
        run.label = label


# --------------------------------------------------------------------------------------------
# Formatting


def _paper(text: str) -> str:
    """A paper number as printed in the paper's table (the CSV's string, so "20.50" keeps its
    digits), or a dash where it gives none."""
    return text or DASH


def _number(text: str) -> float | None:
    return float(text) if text else None


def _diff(measured: float | None, paper: float | None) -> str:
    if measured is None or paper is None:
        return DASH
    return f"{measured - paper:+.2f}"


def _percent(fraction: float) -> str:
    """Three significant digits, but a fraction below 1 never reads "100%": it gets more digits
    (99.96%), so a run short of its schedule cannot pass for a whole one."""
    percent = 100 * fraction
    if fraction >= 1:
        return f"{percent:,.0f}%"
    for digits in range(3, 12):
        text = f"{percent:.{digits}g}"
        if float(text) < 100:
            return f"{text}%"
    return f"{math.floor(percent * 1e9) / 1e9:.9f}%"


def _duration(seconds: float) -> str:
    hours, rest = divmod(int(round(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _run_cell(run: Run) -> str:
    """The run's label, marked when it stopped before the end of its own schedule (partial) and
    when it saw fewer images than the paper's schedule: a 1000-step run is not a reproduction."""
    marks = ["partial"] if run.results.partial else []
    share = run.schedule_share
    if share is not None and share < 1:
        marks.append(f"{_percent(share)} of the paper's schedule")
    return f"{run.label} ({', '.join(marks)})" if marks else run.label


def _err_cell(err: float, evaluation, dataset: str) -> str:
    """A measured error, with the image count when the evaluation did not cover the whole test set."""
    full = FULL_TEST_IMAGES.get(dataset)
    if full is None or evaluation.num_samples == full:
        return f"{err:.2f}"
    return f"{err:.2f} ({evaluation.num_samples:,} of {full:,} images)"


def _options_text(run: Run) -> str:
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


def markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table; '|' inside cells is escaped so columns stay aligned."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    for row in rows:
        if len(row) != len(headers):
            raise AssertionError(f"table row has {len(row)} cells for {len(headers)} columns: {row}")
    return [line(headers), "|" + "|".join("---" for _ in headers) + "|", *(line(r) for r in rows)]


# --------------------------------------------------------------------------------------------
# Table 7 (ImageNet)


def _is_table7_run(run: Run, row: dict) -> bool:
    return run.model == row["model"] and run.dataset == "imagenet" and not run.non_default_options() \
        and not run.label_noise


def _table7(runs: list[Run]) -> tuple[list[str], list[tuple[dict, Run]]]:
    headers = ["Network", "test size", "params M (paper)", "params M (measured)", "Δ params M",
               "MACs G (paper)", "MACs G (measured)", "Δ MACs G", "top-1 err % (paper)",
               "top-1 err % (measured)", "Δ top-1", "top-5 err % (paper)", "top-5 err % (measured)",
               "Δ top-5", "run"]
    rows, matched = [], []
    for row, text in zip(load_table("table7_imagenet"), load_table_text("table7_imagenet")):
        size = row["test_size"]
        paper_cells = [row["network"], str(size)]
        row_runs = [r for r in runs if _is_table7_run(r, row)]
        if not row_runs:
            rows.append(paper_cells + [_paper(text["params_m"]), NOT_RUN, DASH, _paper(text["flops_g"]),
                                       NOT_RUN, DASH, _paper(text["top1_err"]), NOT_RUN, DASH,
                                       _paper(text["top5_err"]), NOT_RUN, DASH, NOT_RUN])
            continue
        for run in row_runs:
            matched.append((row, run))
            res = run.results
            params_m = res.params / 1e6
            macs_g = res.macs / 1e9
            # The paper counts multiply-adds at 224 for every row; a count at another size is shown
            # with its size and not differenced.
            if res.macs_input_size == 224:
                macs_cell, macs_diff = f"{macs_g:.2f}", _diff(macs_g, row["flops_g"])
            else:
                macs_cell, macs_diff = f"{macs_g:.2f} (at {res.macs_input_size})", DASH
            ev = res.evaluation(size)
            if ev is None:
                missing = f"not evaluated at {size}"
                err_cells = [_paper(text["top1_err"]), missing, DASH, _paper(text["top5_err"]), missing, DASH]
            else:
                err_cells = [_paper(text["top1_err"]), _err_cell(ev.top1_err, ev, run.dataset),
                             _diff(ev.top1_err, row["top1_err"]), _paper(text["top5_err"]),
                             _err_cell(ev.top5_err, ev, run.dataset), _diff(ev.top5_err, row["top5_err"])]
            rows.append(paper_cells + [_paper(text["params_m"]), f"{params_m:.2f}", _diff(params_m, row["params_m"]),
                                       _paper(text["flops_g"]), macs_cell, macs_diff, *err_cells, _run_cell(run)])
    return markdown_table(headers, rows), matched


# --------------------------------------------------------------------------------------------
# CIFAR ablations (Tables 1, 3, 5, 6)


@dataclass
class Entry:
    """One cell of a paper table that a run can reproduce."""

    labels: list[str]  # the row's identifying columns
    err: str  # the paper's error in percent, as printed
    match: Callable[[Run], bool]
    params_m: str = ""  # the paper's params (1e6), as printed; "" where not a column


@dataclass
class Section:
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
         for r, text in zip(load_table("table3_arl_nal"), load_table_text("table3_arl_nal")) for kind in ("ARL", "NAL")],
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


def _section_table(section: Section, runs: list[Run]) -> tuple[list[str], list[Run]]:
    headers = list(section.label_headers)
    if section.with_params:
        headers += ["params M (paper)", "params M (measured)", "Δ params M"]
    headers += ["top-1 err % (paper)", "top-1 err % (measured)", "Δ top-1", "run"]
    rows, matched = [], []
    for entry in section.entries:
        entry_runs = [r for r in runs if entry.match(r)]
        if not entry_runs:
            params = [_paper(entry.params_m), NOT_RUN, DASH] if section.with_params else []
            rows.append(entry.labels + params + [_paper(entry.err), NOT_RUN, DASH, NOT_RUN])
        for run in entry_runs:
            matched.append(run)
            params = []
            if section.with_params:
                params_m = run.results.params / 1e6
                params = [_paper(entry.params_m), f"{params_m:.2f}", _diff(params_m, _number(entry.params_m))]
            ev = run.results.evaluation(CIFAR_TEST_SIZE)
            if ev is None:
                errs = [_paper(entry.err), f"not evaluated at {CIFAR_TEST_SIZE}", DASH]
            else:
                errs = [_paper(entry.err), _err_cell(ev.top1_err, ev, run.dataset), _diff(ev.top1_err, _number(entry.err))]
            rows.append(entry.labels + params + errs + [_run_cell(run)])
    return markdown_table(headers, rows), matched


# --------------------------------------------------------------------------------------------
# Provenance, other runs, throughput


def _provenance(runs: list[Run]) -> list[str]:
    headers = ["run", "model", "data set", "status", "steps done / configured", "of the paper's schedule",
               "epochs", "global batch", "world size x device", "precision", "wall time", "GPU-hours",
               "evaluated (size: images)", "git commit"]
    rows = []
    for run in runs:
        res = run.results
        paper_images = PAPER_SCHEDULE_IMAGES.get(run.dataset)
        schedule = DASH if paper_images is None else f"{_percent(run.schedule_share)} of {paper_images:,} images"
        evals = "; ".join(_evaluated(e) for e in sorted(res.evaluations, key=lambda e: e.size))
        full = FULL_TEST_IMAGES.get(run.dataset)
        if full is not None and any(e.num_samples != full for e in res.evaluations):
            evals += f" (not the full {full:,}-image {'validation' if run.dataset == 'imagenet' else 'test'} set)"
        data = f"{res.dataset} ({res.num_classes} classes)"
        if res.label_noise:
            data += f", {res.label_noise:g} label noise"
        if res.skipped_images:
            data += f", {res.skipped_images} unreadable training images replaced"
        if run.dataset in ("cifar10", "cifar100") or run.augmentation != "imagenet":
            data += f", {run.augmentation} augmentation"
        gpu_hours = f"{res.gpu_hours:.2f}" if res.device_type == "cuda" else f"0 ({res.device_type})"
        rows.append([run.label, res.model, data, run.status,
                     f"{res.steps:,} / {res.total_steps:,} ({_percent(res.steps / res.total_steps) if res.total_steps else DASH})",
                     schedule, f"{res.epochs:.2f}", str(res.global_batch_size),
                     f"{res.world_size} x {res.device_name}", res.precision, _duration(res.wall_time_s),
                     gpu_hours, evals or "not evaluated", res.git_commit[:10] or DASH])
    return markdown_table(headers, rows)


def _evaluated(ev) -> str:
    """`size: images` of one evaluation, with the unreadable validation images it replaced."""
    skipped = getattr(ev, "skipped_images", 0)  # absent before results.json recorded it
    return f"{ev.size}: {ev.num_samples:,}" + (f" ({skipped:,} unreadable, replaced)" if skipped else "")


def _other_runs(runs: list[Run]) -> list[str]:
    table7_models = {r["model"] for r in load_table("table7_imagenet")}
    headers = ["run", "model", "data set", "options", "why not in a paper table", "params M",
               "MACs G (at size)", "test size", "top-1 err %", "top-5 err %", "chance top-1 err %", "status"]
    rows = []
    for run in runs:
        res = run.results
        if run.dataset not in ("imagenet", "cifar10", "cifar100"):
            why = f"trained on {run.dataset}, not a data set of the paper's tables"
        elif run.dataset == "imagenet" and run.model not in table7_models:
            why = "model is not in Table 7"
        elif run.dataset == "imagenet":
            why = "options or label noise differ from Table 7"
        elif run.augmentation != "cifar":
            why = (f"trained with the {run.augmentation} augmentation (data.augmentation: {run.augmentation}), "
                   f"not the paper's CIFAR recipe ({CIFAR_RECIPE}; data.augmentation: cifar)")
        else:
            why = "model, options or label noise match no CIFAR table row"
        base = [run.label, res.model, res.dataset, _options_text(run), why, f"{res.params / 1e6:.3g}",
                f"{res.macs / 1e9:.3g} (at {res.macs_input_size})"]
        chance = f"{100 * (1 - 1 / res.num_classes):.2f}"  # guessing uniformly among the classes
        evals = sorted(res.evaluations, key=lambda e: e.size)
        if not evals:
            rows.append(base + [DASH, "not evaluated", "not evaluated", chance, run.status])
        for ev in evals:
            rows.append(base + [str(ev.size), f"{ev.top1_err:.2f}", f"{ev.top5_err:.2f}", chance, run.status])
    return markdown_table(headers, rows)


def _throughput(runs: list[Run]) -> list[str]:
    recorded = [r for r in runs if r.results.train_images_per_s is not None or r.results.infer_images_per_s is not None]
    if not recorded:
        return ["No run recorded throughput (`train_images_per_s` / `infer_images_per_s` in results.json)."]
    headers = ["run", "model", "world size x device", "precision", "global batch", "train images/s",
               "train images/s per device", "inference images/s"]
    rows = []
    for run in recorded:
        res = run.results
        train = res.train_images_per_s
        rows.append([run.label, res.model, f"{res.world_size} x {res.device_name}", res.precision,
                     str(res.global_batch_size), DASH if train is None else f"{train:,.1f}",
                     DASH if train is None else f"{train / res.world_size:,.1f}",
                     DASH if res.infer_images_per_s is None else f"{res.infer_images_per_s:,.1f}"])
    return markdown_table(headers, rows)


# --------------------------------------------------------------------------------------------
# Plots


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
            ax.annotate(_run_cell(run), (x, ev.top1_err),
                        fontsize=6, color="tab:orange", xytext=(3, -8), textcoords="offset points")
        ax.set(xlabel=xlabel, ylabel="top-1 error % (single crop, row's test size)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_title("Top-1 error vs parameters")
    axes[1].set_title("Top-1 error vs multiply-adds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# The report


def write_report(run_dirs: list[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Write the markdown report of `run_dirs` to `output` and its PNG plots next to it."""
    runs = [load_run(d) for d in run_dirs]
    _unique_labels(runs)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    stem = output.stem

    lines = [f"# ran-bench report: {stem}", "",
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC by `ran-bench report` from "
             f"{len(runs)} run director{'y' if len(runs) == 1 else 'ies'}. Paper: Wang et al., "
             "\"Residual Attention Network for Image Classification\", CVPR 2017 (numbers in "
             "`reports/paper/`). Measured numbers come only from the runs' `results.json`; a row "
             "without a run says \"not run\"; a run's cell says \"partial\" when it stopped before the end of "
             "its own schedule and gives the share of the paper's schedule (images seen) when it trained "
             "on fewer images than the paper. CIFAR rows take only runs trained with the paper's CIFAR "
             f"augmentation ({CIFAR_RECIPE}). Δ = measured − paper; error differences are in percentage "
             "points.", ""]

    table7, matched7 = _table7(runs)
    cifar = any(r.dataset in ("cifar10", "cifar100") for r in runs)
    sections = [(section, *_section_table(section, runs)) for section in cifar_sections()] if cifar else []
    in_tables = {id(run) for _, run in matched7} | {id(r) for _, _, matched in sections for r in matched}
    others = [r for r in runs if id(r) not in in_tables]
    lines += [f"Runs: {len(matched7)} compared with a Table 7 row, "
              f"{len({id(r) for _, _, matched in sections for r in matched})} with a CIFAR table row, "
              f"{len(others)} match no paper row (listed under other runs, not compared with the paper).", ""]
    lines += ["## Table 7: ImageNet-1K, single-crop validation error", "",
              "Measured params and multiply-adds (MACs) are counted from the model by the run; the paper "
              "counts multiply-adds at 224x224 for every row, so a count at another size is shown with "
              "its size and not differenced. Errors are the run's evaluation at the row's test size.", "",
              *table7, ""]
    plot7 = output.with_name(f"{stem}_table7.png")
    plot_table7(matched7, plot7)
    lines += [f"![Top-1 error against parameters and multiply-adds]({plot7.name})", "",
              "Blue: the paper's Table 7 (rows with published params and FLOPs); orange crosses: "
              "measured runs, joined to their paper point by a dashed line and labelled like their "
              "table cell (partial, share of the paper's schedule).", ""]

    if sections:
        for section, table, _ in sections:
            lines += [f"## {section.title}", "", section.note, "", *table, ""]
        lines += ["Table 4 (mask structure) is not reproduced as a table: its numbers are not in "
                  "`reports/paper/`. A blog summary of the paper (not the paper itself) states the "
                  "encoder-decoder (bottom-up top-down) mask is about 0.94 points better than local "
                  "convolutions on CIFAR-10; runs with `model.options.mask: local_conv` are listed under "
                  "other runs.", ""]

    if others:
        lines += ["## Other runs", "",
                  "Runs whose model, data set or options match no row of the paper's tables; "
                  "their numbers are not comparable with the paper's.", "", *_other_runs(others), ""]

    lines += ["## How each measured number was obtained", "",
              "Steps are optimizer steps of the run's configured schedule; the paper's schedule is "
              "530k iterations at batch 256 on ImageNet and 160k at batch 64 on CIFAR. "
              f"{THROUGHPUT_DEFINITIONS['gpu_hours']}", "", *_provenance(runs), ""]

    lines += ["## Throughput", "", "As recorded by each run in results.json:", "",
              *(f"- {THROUGHPUT_DEFINITIONS[key]}" for key in ("train", "per_device", "infer")), "",
              *_throughput(runs), ""]

    plot_curves = output.with_name(f"{stem}_training.png")
    lines += ["## Training curves", ""]
    if plot_training(runs, plot_curves):
        lines += [f"![Training loss and top-1 error against steps]({plot_curves.name})", ""]
        missing = [r.label for r in runs if not (r.train_metrics or r.eval_metrics)]
        if missing:
            lines += [f"No metrics.jsonl for: {', '.join(missing)}.", ""]
    else:
        lines += ["None of the runs has a metrics.jsonl.", ""]

    output.write_text("\n".join(lines))
    return output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories written by `ran-bench train` (results.json, config.yaml, metrics.jsonl)")
    parser.add_argument("-o", "--output", default="reports/imagenet.md",
                        help="markdown file to write; plots go next to it (default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    path = write_report(args.run_dirs, args.output)  # bad runs raise UserErrors: exit 2 with the message
    print(f"wrote {path} and its plots in {path.parent}")
    return 0
