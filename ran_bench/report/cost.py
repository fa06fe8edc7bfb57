"""The report's "to reproduce" table: for every Table 7 row, the paper's schedule in images and
what it costs on each device `ran-bench bench train` recorded (hours on one device, wall time on 8
and 32), by the rules of `ran_bench.bench.rates`, naming the bench row of each figure; "not
measured" where no row exists."""

from __future__ import annotations

import os

from ran_bench.bench.rates import device_hours_text, hours_text, other_sizes, rate_text, train_rates, wall_hours
from ran_bench.config import recipe
from ran_bench.markdown import table as markdown_table
from ran_bench.paper import load_table
from ran_bench.report.cells import DASH
from ran_bench.report.runs import PAPER_SCHEDULE_IMAGES

DEVICE_COUNTS = (8, 32)
NOT_MEASURED = "not measured"

HEADERS = ["Network", "train size", "paper's schedule (images)", "device", "precision",
           "images/s per device (rate used)", "hours on one device (GPU-hours)",
           *(f"wall time on {n} devices" for n in DEVICE_COUNTS), "bench row"]


def table(rows: list[dict[str, str]], problem: str | None = None) -> list[str]:
    """The "to reproduce" table: a line per Table 7 row and recorded device, precision and kind of
    rate, or a "not measured" line saying which row is missing."""
    images = PAPER_SCHEDULE_IMAGES["imagenet"]
    lines = []
    for paper in load_table("table7_imagenet"):
        model = paper["model"]
        cfg = recipe(model)
        size = cfg.data.train_size if cfg is not None else None
        base = [paper["network"], str(size or DASH), f"{images:,}"]
        rates = train_rates(rows, model, size) if size is not None else []
        for rate in rates:
            walls = [wall_hours(rows, rate, images, n) for n in DEVICE_COUNTS]
            lines.append(base + [rate.device, rate.precision, f"{rate_text(rate.images_per_s)} {rate.kind()}",
                                 device_hours_text(rate.hours(images)),
                                 *(f"{hours_text(h)} ({how})" for h, how in walls), rate.source()])
        if not rates:
            lines.append(base + [DASH, DASH, *[NOT_MEASURED] * (2 + len(DEVICE_COUNTS)),
                                 _missing(rows, model, size, problem)])
    return markdown_table(HEADERS, lines)


def _missing(rows: list[dict[str, str]], model: str, size: int | None, problem: str | None) -> str:
    """Why a Table 7 row has no figure, naming rows of the model at other sizes."""
    if problem is not None:
        return "no bench rows read (see above)"
    if size is None:
        return f"no recipe configs/{model}.yaml, so no train size to match"
    others = other_sizes(rows, model, size)
    text = f"no `bench train` row of {model} at {size}"
    return text + (f" (rows at {', '.join(others)}: not its train size)" if others else "")


def note(rows: list[dict[str, str]], problem: str | None, csv_path: str | os.PathLike) -> str:
    """The table's rules: the paper's schedule and its source, where the rates come from, which
    rate, the arithmetic and its assumptions."""
    images = PAPER_SCHEDULE_IMAGES["imagenet"]
    read = problem or f"{sum(r['mode'] == 'train' for r in rows)} `bench train` rows read"
    return ("The paper's schedule: the paper stops ImageNet training at 530k iterations (learning rate divided "
            "by 10 at 200k, 400k and 500k) and gives no global batch beyond at least 32 images per GPU; at 256, "
            "the batch its learning rate of 0.1 is commonly used with and the recipes' `optim.global_batch_size`, "
            f"that is 530,000 x 256 = {images:,} images. Its cost is over the training rate per device that "
            f"`ran-bench bench train` recorded in `{csv_path}` ({read}) at the model's train size (its recipe, "
            "`configs/<model>.yaml`). One line per recorded device, precision and kind of rate: the fastest "
            "model-only rate (synthetic batches already on the device, so data loading not included: the cost "
            "with a loader that keeps up) and, where one was recorded, the fastest end-to-end rate (the loader "
            "and data its cell names feeding the trainer). "
            "Hours on one device = images / rate / 3600 (GPU-hours on a GPU). Wall time on N devices = those "
            "hours / N: that assumes linear scaling, which is not measured, unless a `bench scaling` row of the "
            "same model, size, device and precision at N processes measured the efficiency (the cell says "
            "which). The rate is per device at the bench row's batch (last column); 256 images over 8 devices "
            "is 32 per device and over 32 devices 8, where the rate may differ. Evaluations, checkpoints and "
            "start-up are not included. \"not measured\": no such row; nothing is estimated.")
