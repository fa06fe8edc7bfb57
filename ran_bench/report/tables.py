"""The report's ImageNet and run tables: Table 7 beside the runs, the runs that match no paper row,
how each measured number was obtained (provenance), and the throughput the runs recorded."""

from __future__ import annotations

from ran_bench.markdown import table
from ran_bench.paper import load_table, load_table_text
from ran_bench.report.cells import DASH, NOT_RUN, diff, duration, err_cell, options_text, paper_cell, percent, run_cell
from ran_bench.report.cifar import CIFAR_RECIPE
from ran_bench.report.runs import FULL_TEST_IMAGES, PAPER_SCHEDULE_IMAGES, Run
from ran_bench.results import Evaluation

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


def _is_table7_run(run: Run, row: dict) -> bool:
    return run.model == row["model"] and run.dataset == "imagenet" and not run.non_default_options() \
        and not run.label_noise


def table7(runs: list[Run]) -> tuple[list[str], list[tuple[dict, Run]]]:
    """Table 7 as a markdown table, a row per paper row and run ("not run" rows for paper rows
    without one), and the (paper row, run) pairs it compared."""
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
            rows.append(paper_cells + [paper_cell(text["params_m"]), NOT_RUN, DASH, paper_cell(text["flops_g"]),
                                       NOT_RUN, DASH, paper_cell(text["top1_err"]), NOT_RUN, DASH,
                                       paper_cell(text["top5_err"]), NOT_RUN, DASH, NOT_RUN])
            continue
        for run in row_runs:
            matched.append((row, run))
            res = run.results
            params_m = res.params / 1e6
            macs_g = res.macs / 1e9
            # The paper counts multiply-adds at 224 for every row: a count at another size is not differenced.
            if res.macs_input_size == 224:
                macs_cell, macs_diff = f"{macs_g:.2f}", diff(macs_g, row["flops_g"])
            else:
                macs_cell, macs_diff = f"{macs_g:.2f} (at {res.macs_input_size})", DASH
            ev = res.evaluation(size)
            if ev is None:
                missing = f"not evaluated at {size}"
                err_cells = [paper_cell(text["top1_err"]), missing, DASH, paper_cell(text["top5_err"]), missing, DASH]
            else:
                err_cells = [paper_cell(text["top1_err"]), err_cell(ev.top1_err, ev, run.dataset),
                             diff(ev.top1_err, row["top1_err"]), paper_cell(text["top5_err"]),
                             err_cell(ev.top5_err, ev, run.dataset), diff(ev.top5_err, row["top5_err"])]
            rows.append(paper_cells + [paper_cell(text["params_m"]), f"{params_m:.2f}", diff(params_m, row["params_m"]),
                                       paper_cell(text["flops_g"]), macs_cell, macs_diff, *err_cells, run_cell(run)])
    return table(headers, rows), matched


def provenance(runs: list[Run]) -> list[str]:
    """How each run's numbers were obtained: data, schedule, hardware, precision, cost, evaluations."""
    headers = ["run", "model", "data set", "status", "steps done / configured", "of the paper's schedule",
               "epochs", "global batch", "world size x device", "precision", "wall time", "GPU-hours",
               "evaluated (size: images)", "git commit"]
    rows = []
    for run in runs:
        res = run.results
        paper_images = PAPER_SCHEDULE_IMAGES.get(run.dataset)
        schedule = DASH if paper_images is None else f"{percent(run.schedule_share)} of {paper_images:,} images"
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
                     f"{res.steps:,} / {res.total_steps:,} "
                     f"({percent(res.steps / res.total_steps) if res.total_steps else DASH})",
                     schedule, f"{res.epochs:.2f}", str(res.global_batch_size),
                     f"{res.world_size} x {res.device_name}", res.precision, duration(res.wall_time_s),
                     gpu_hours, evals or "not evaluated", res.git_commit[:10] or DASH])
    return table(headers, rows)


def _evaluated(ev: Evaluation) -> str:
    """`size: images` of one evaluation, with the unreadable validation images it replaced."""
    skipped = getattr(ev, "skipped_images", 0)  # absent before results.json recorded it
    return f"{ev.size}: {ev.num_samples:,}" + (f" ({skipped:,} unreadable, replaced)" if skipped else "")


def other_runs(runs: list[Run]) -> list[str]:
    """Runs that match no paper row, with the reason, their errors and the chance-level error."""
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
        base = [run.label, res.model, res.dataset, options_text(run), why, f"{res.params / 1e6:.3g}",
                f"{res.macs / 1e9:.3g} (at {res.macs_input_size})"]
        chance = f"{100 * (1 - 1 / res.num_classes):.2f}"  # guessing uniformly among the classes
        evals = sorted(res.evaluations, key=lambda e: e.size)
        if not evals:
            rows.append(base + [DASH, "not evaluated", "not evaluated", chance, run.status])
        for ev in evals:
            rows.append(base + [str(ev.size), f"{ev.top1_err:.2f}", f"{ev.top5_err:.2f}", chance, run.status])
    return table(headers, rows)


def throughput(runs: list[Run]) -> list[str]:
    """The training and inference speed the runs recorded, or a sentence when none did."""
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
    return table(headers, rows)
