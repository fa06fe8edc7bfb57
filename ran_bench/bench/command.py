"""`ran-bench bench MODE`: run the mode, print what a person reads, and save the record(s): the
JSON file, a row of results.csv and the regenerated README. The arguments are declared in
`ran_bench.cli.bench_arguments`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from ran_bench.bench import BenchError
from ran_bench.bench.flops import roofline_fraction, training_roofline
from ran_bench.bench.modes import run_data, run_infer, run_scaling, run_train
from ran_bench.bench.options import resolve_options
from ran_bench.bench.readme import write_readme
from ran_bench.bench.record import (
    BenchRecord,
    append_csv,
    csv_value,
    read_csv,
    record_name,
    write_csv,
    write_json,
)


def main(args: argparse.Namespace) -> int:
    if args.mode == "readme":
        return _readme(args)
    resolve_options(args)
    if args.mode == "scaling":
        records = run_scaling(args)
        print(_scaling_table(records))
    else:
        records = [{"train": run_train, "infer": run_infer, "data": run_data}[args.mode](args)]
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # one record per run, from the first process
    for rec in records:
        print(summary(rec))
    path = save(records, args.out_dir, json_path=args.json, record_csv=not args.no_record)
    print(f"wrote {path}" + ("" if args.no_record else f"; appended {args.out_dir / 'results.csv'} and "
                                                      f"regenerated {args.out_dir / 'README.md'}"))
    return 0


def save(records: Sequence[BenchRecord], out_dir: Path, *, json_path: Path | None = None,
         record_csv: bool = True) -> Path:
    """Write the JSON (one record, or a list for scaling), append the CSV rows and regenerate the
    README. Returns the JSON path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = Path(json_path) if json_path else out_dir / f"{record_name(records[0])}.json"
    write_json(records, json_path)
    if record_csv:
        append_csv(records, out_dir / "results.csv")
        write_readme(out_dir / "results.csv", out_dir / "README.md")
    return json_path


def _row_key(row: dict[str, str]) -> tuple[str, str, str]:
    """What identifies one measurement: adding the same CSV twice must not double its rows."""
    return row["time_utc"], row["command"], row["device_name"]


def fill_rooflines(rows: Sequence[dict[str, str]]) -> int:
    """Give the GPU training rows recorded without a roofline (before the column existed, or by an
    older checkout) the one the run would have recorded: computed from the row's model, size, batch,
    precision and GPU name, and said so in roofline_source. Returns how many rows got one."""
    filled = 0
    for row in rows:
        if row["mode"] != "train" or row["roofline_source"]:
            continue
        limit, source = training_roofline(row["model"], int(row["size"]), int(row["batch_size"]),
                                          device_type=row["device_type"], device_name=row["device_name"],
                                          precision=row["precision"])
        if limit is None:
            continue  # CPU, fp32 or an unknown GPU: no limit, and no reason invented for an old row
        row["roofline_images_per_s"] = csv_value(limit.images_per_s)
        row["roofline_fraction"] = csv_value(roofline_fraction(float(row["images_per_s"]), limit))
        row["roofline_source"] = f"{source}; added by `ran-bench bench readme` from the row, after the run"
        filled += 1
    return filled


def _readme(args: argparse.Namespace) -> int:
    """The readme mode: add the new rows of each --add CSV to results.csv, give GPU training rows
    recorded without one their roofline, then regenerate README.md."""
    csv_path = args.out_dir / "results.csv"
    for extra in args.add:
        if not Path(extra).is_file():
            raise BenchError(f"--add {extra}: no such file (give the results.csv a benchmark run wrote)")
        rows = read_csv(csv_path) if csv_path.exists() else []
        seen = {_row_key(r) for r in rows}
        offered, added = read_csv(extra), []
        for row in offered:
            if _row_key(row) not in seen:
                seen.add(_row_key(row))
                added.append(row)
        write_csv(rows + added, csv_path)
        skipped = len(offered) - len(added)
        print(f"added {len(added)} row(s) of {extra} to {csv_path}"
              + (f"; {skipped} already there (same time, command and device)" if skipped else ""))
    rows = read_csv(csv_path) if csv_path.exists() else []
    filled = fill_rooflines(rows)
    if filled:
        write_csv(rows, csv_path)
        print(f"added the roofline to {filled} GPU training row(s) of {csv_path} recorded without it "
              "(computed from each row's model, size, batch, precision and GPU)")
    write_readme(csv_path, args.out_dir / "README.md")
    print(f"regenerated {args.out_dir / 'README.md'} from {csv_path}")
    return 0


def _fmt_rate(t: float, lo: float, hi: float) -> str:
    return f"{t:.1f} images/s (median; {lo:.1f}-{hi:.1f})"


def summary(record: BenchRecord) -> str:
    """What a person reads after a run."""
    r = record
    head = (f"{r.mode}: {r.model or r.backend} {r.size}px batch {r.batch_size}/process, {r.precision}"
            f"{', channels_last' if r.channels_last else ''}{', compiled' if r.compile else ''}, "
            f"{r.world_size} process(es) on {r.device_name}")
    what = {"train": "model-only (the trainer's step, synthetic batches on the device)",
            "infer": "model-only (forward, synthetic batches on the device)",
            "data": f"input pipeline alone ({r.backend})",
            "scaling": "per process (the trainer's step, synthetic batches)"}[r.mode]
    lines = [head,
             f"  {what}: {_fmt_rate(r.images_per_s, r.images_per_s_min, r.images_per_s_max)}, "
             f"{r.step_time_median_s * 1e3:.1f} ms/step over {r.repeats} x {r.steps} steps",
             f"  peak memory: {r.peak_memory_mib:.0f} MiB ({r.peak_memory_kind})"]
    if r.world_size > 1:
        lines.append(f"  all processes: {r.images_per_s_total:.1f} images/s")
    if r.macs is not None:
        mfu = f"{r.mfu:.1%}" if r.mfu is not None else "n/a"
        lines.append(f"  {r.macs / 1e9:.3f} GMACs/image forward -> {r.tflops:.3g} TFLOP/s achieved, "
                     f"MFU {mfu} (peak: {r.peak_tflops or 'unknown'}; {r.peak_source})")
        lines.append(f"  convention: {r.flop_convention}")
    if r.mode == "train":
        lines.append(f"  % of roofline: {r.roofline_fraction:.1%} of the unfused roofline's "
                     f"{r.roofline_images_per_s:.1f} images/s ({r.roofline_source})"
                     if r.roofline_images_per_s is not None else f"  % of roofline: none ({r.roofline_source})")
    if r.end_to_end_images_per_s is not None:
        verdict = ("the data loader limits" if r.limiter == "data loader"
                   else "the model limits (the loader keeps up)")
        lines.append(f"  end-to-end with the {r.end_to_end_backend} loader on {r.data_root}: "
                     f"{r.end_to_end_images_per_s:.1f} images/s = {r.end_to_end_fraction:.0%} of model-only "
                     f"-> {verdict}")
    if r.trainer_over_bare is not None:
        lines.append(f"  overhead of train_step alone (not the training loop around it) on the same pre-made "
                     f"batches: train_step {r.overhead_trainer_images_per_s:.1f} images/s, bare PyTorch "
                     f"forward/backward/step {r.bare_images_per_s:.1f} images/s (same initial weights, optimizer "
                     f"settings, batches and steps): train_step/bare step time = {r.trainer_over_bare:.3f}")
        if r.trainer_over_timm is not None:
            lines.append(f"  timm's benchmark recipe on the same model ({r.timm_model}): {r.timm_images_per_s:.1f} "
                         f"images/s: train_step/timm step time = {r.trainer_over_timm:.3f}")
        else:
            lines.append(f"  timm's benchmark recipe: {r.timm_model}")
    if r.scaling_efficiency is not None:
        lines.append(f"  scaling efficiency vs the smallest process count: {r.scaling_efficiency:.0%}")
    return "\n".join(lines)


def _scaling_table(records: Sequence[BenchRecord]) -> str:
    rows = [f"{'processes':>9}  {'images/s total':>14}  {'per process':>11}  {'efficiency':>10}"]
    rows += [f"{r.world_size:>9}  {r.images_per_s_total:>14.1f}  {r.images_per_s:>11.1f}  "
             f"{r.scaling_efficiency:>10.0%}" for r in records]
    return "\n".join(rows)
