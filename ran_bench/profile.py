"""Parameters and multiply-adds of the model zoo, beside the paper's figures (`ran-bench profile`).

Multiply-adds are counted with PyTorch's maintained counter, `torch.utils.flop_counter`, which
counts the FLOPs of convolutions and matrix products (linear layers) only; one multiply-add is two
FLOPs, so MACs = FLOPs / 2. BatchNorm, activations, pooling, upsampling and the attention
products are not counted: that is the paper's convention (convolutions and the classifier).

With `--roofline`: the unfused roofline of one training step instead (`ran_bench.roofline`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ran_bench import markdown
from ran_bench.errors import InputError
from ran_bench.fileio import atomic_write
from ran_bench.models import MAC_CONVENTION, count_macs, count_params, create_model, list_models, model_info
from ran_bench.paper import load_table, released_definition, table7_row
from ran_bench.roofline import CONVENTION as ROOFLINE_CONVENTION
from ran_bench.roofline import DEVICES, DeviceSpec, Roofline, device_spec, roofline

# --------------------------------------------------------------------------------------------
# The zoo beside the paper

PAPER_MAC_SIZE = 224  # the paper counts FLOPs (multiply-adds) at 224x224, also for rows tested at 299/320
CIFAR_SIZE = 32


def _paper_figures(name: str, dataset: str) -> dict:
    """The paper's parameter/FLOP figures for `name`: Table 7 (ImageNet) or Table 6 (CIFAR), and the
    counts of the authors' released definitions; None where the paper has no figure."""
    figures = {"paper_source": None, "paper_params": None, "paper_macs": None,
               "released_params": None, "released_macs": None}
    if dataset == "cifar":
        row = next((r for r in load_table("table6_cifar") if r["model"] == name), None)
        if row is not None:
            figures.update(paper_source="Table 6", paper_params=_scaled(row["params_m"], 1e6))
    else:
        row = table7_row(name)
        if row is not None:
            given = row["params_m"] is not None or row["flops_g"] is not None
            figures.update(paper_source="Table 7" if given else "Table 7 (gives none)",
                           paper_params=_scaled(row["params_m"], 1e6), paper_macs=_scaled(row["flops_g"], 1e9))
        released = released_definition(name)
        if released is not None:
            figures.update(released_params=int(released["params"]), released_macs=_scaled(released["macs_g"], 1e9))
    return figures


def _scaled(value: float | None, unit: float) -> int | None:
    return None if value is None else round(value * unit)


def _rel_diff(measured: int, reference: int | None) -> float | None:
    return None if reference is None else (measured - reference) / reference


def profile_model(name: str, size: int | None = None) -> dict:
    """Parameters and multiply-adds of registered model `name` beside the paper's figures.

    ImageNet models are counted at `size` (default 224, the size at which the paper counts FLOPs),
    CIFAR models at 32. The model is built on the meta device: shapes only, no memory, no arithmetic.
    The paper's and the released definitions' multiply-adds are given only when the input size is the
    one they were counted at (224). Relative differences are (ours - theirs) / theirs.
    """
    info = model_info(name)
    input_size = CIFAR_SIZE if info.dataset == "cifar" else (size or PAPER_MAC_SIZE)
    with torch.device("meta"):
        model = create_model(name)
    params = count_params(model)
    macs = count_macs(model, input_size)
    figures = _paper_figures(name, info.dataset)
    if input_size != PAPER_MAC_SIZE:
        figures.update(paper_macs=None, released_macs=None)
    return {
        "model": name,
        "dataset": info.dataset,
        "input_size": input_size,
        "params": params,
        "macs": macs,
        **figures,
        "params_vs_paper": _rel_diff(params, figures["paper_params"]),
        "params_vs_released": _rel_diff(params, figures["released_params"]),
        "macs_vs_paper": _rel_diff(macs, figures["paper_macs"]),
        "macs_vs_released": _rel_diff(macs, figures["released_macs"]),
    }


# --------------------------------------------------------------------------------------------
# `ran-bench profile`

NOTES = [
    "Parameters: every learnable tensor (convolutions, classifier, 2 per BatchNorm channel).",
    "Paper: Table 7 (ImageNet; FLOPs are multiply-adds at 224x224, also for rows tested at 299/320) "
    "and Table 6 (CIFAR parameters). Released: the authors' Caffe deploy definitions counted the same "
    "way (reports/paper/released_definitions.csv). Δ = (ours - theirs) / theirs.",
    "Table 7 prints 31.9 M / 51.3 M for Attention-56 / Attention-92; the released definitions have "
    "31.81 M / 52.47 M, which is what the models here follow.",
]


def _millions(value: int | None, unit: float, digits: int) -> str:
    return "–" if value is None else f"{value / unit:.{digits}f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{round(value * 100, 2) + 0.0:+.2f}%"  # + 0.0: no "-0.00%"


def table_rows(profiles: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of the profile table."""
    headers = ["model", "dataset", "input", "params (M)", "paper (M)", "Δ paper", "released (M)", "Δ released",
               "MACs (G)", "paper (G)", "Δ paper", "released (G)", "Δ released", "paper source"]
    rows = [[
        p["model"], p["dataset"], str(p["input_size"]),
        _millions(p["params"], 1e6, 2), _millions(p["paper_params"], 1e6, 2), _percent(p["params_vs_paper"]),
        _millions(p["released_params"], 1e6, 3), _percent(p["params_vs_released"]),
        _millions(p["macs"], 1e9, 3), _millions(p["paper_macs"], 1e9, 1), _percent(p["macs_vs_paper"]),
        _millions(p["released_macs"], 1e9, 3), _percent(p["macs_vs_released"]),
        p["paper_source"] or "–",
    ] for p in profiles]
    return headers, rows


def format_text(profiles: list[dict]) -> str:
    """Plain-text table for the terminal."""
    headers, rows = table_rows(profiles)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    numeric = range(2, len(headers) - 1)  # right-aligned: everything but model, dataset and source
    lines = ["  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", f"MACs: {MAC_CONVENTION}.", *NOTES])


def format_markdown(profiles: list[dict], command: str) -> str:
    """The markdown written by `--output` (reports/model_zoo.md); `command` is the one that made it."""
    headers, rows = table_rows(profiles)
    out = ["# Model zoo: parameters and multiply-adds", "",
           f"Generated by `{command}`.", "",
           f"MACs: {MAC_CONVENTION}.", "",
           *markdown.table(headers, rows, right=set(range(2, len(headers) - 1)))]
    out += ["", *(f"- {note}" for note in NOTES), ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# `ran-bench profile --roofline`

def _aligned(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [headers, *rows]]
    return [lines[0], "  ".join("-" * w for w in widths), *lines[1:]]


def _roofline_block(group: list[Roofline]) -> list[str]:
    """One model's split per op kind (per trained image, time on each device) and its top ops by bytes."""
    first, batch = group[0], group[0].batch
    rows = [[k.kind, f"{k.flops / batch / 1e9:.2f}", f"{k.bytes / batch / 1e9:.3f}",
             *(f"{r.kinds[i].seconds / batch * 1e6:.1f}" for r in group)] for i, k in enumerate(first.kinds)]
    rows.append(["total", f"{first.flops / batch / 1e9:.2f}", f"{first.bytes / batch / 1e9:.3f}",
                 *(f"{r.seconds / batch * 1e6:.1f}" for r in group)])
    lines = [f"{first.model} at {first.size} px, batch {batch}, per trained image:",
             *_aligned(["kind", "GFLOP", "GB", *(f"µs {r.device.name}" for r in group)], rows),
             "memory-bound ops: " + ", ".join(f"{r.memory_bound_share:.0%} of the time on {r.device.name}"
                                              for r in group),
             "top ops by bytes:"]
    lines += [f"  {op.op} ({op.kind}, {op.calls} calls per step): {op.bytes / batch / 1e9:.3f} GB, {op.share:.1%}"
              for op in first.top_ops]
    return lines


def format_roofline(rooflines: list[Roofline]) -> str:
    """A row per model (images/s at the roofline of each device), then each model's split."""
    groups: dict[tuple[str, int, int], list[Roofline]] = {}
    for r in rooflines:
        groups.setdefault((r.model, r.size, r.batch), []).append(r)
    devices = list(dict.fromkeys(r.device for r in rooflines))
    rows = [[model, str(size), str(batch), f"{group[0].flops / batch / 1e9:.2f}",
             f"{group[0].bytes / batch / 1e9:.3f}", *(f"{r.images_per_s:,.0f}" for r in group)]
            for (model, size, batch), group in groups.items()]
    lines = ["Unfused roofline of one training step: a limit, not a measurement.",
             *(f"  {d.name}: {d.peak_tflops:g} TFLOP/s bf16 dense, {d.bandwidth_tbs:g} TB/s ({d.source})"
               for d in devices), "",
             *_aligned(["model", "input", "batch", "GFLOP/img", "GB/img", *(f"img/s {d.name}" for d in devices)], rows)]
    for group in groups.values():
        lines += ["", *_roofline_block(group)]
    return "\n".join([*lines, "", *(f"- {line}." for line in ROOFLINE_CONVENTION)])


def roofline_devices(args: argparse.Namespace) -> list[DeviceSpec]:
    """The devices of --device (comma-separated) or the one of --peak-tflops and --bandwidth (default H100)."""
    custom = args.peak_tflops is not None or args.bandwidth is not None
    if args.device is not None and custom:
        raise InputError("give either --device or --peak-tflops with --bandwidth, not both")
    if not custom:
        names = [name.strip() for name in (args.device or "h100").split(",") if name.strip()]
        if not names:
            raise InputError(f"--device names no device; known: {', '.join(DEVICES)}")
        return [device_spec(name) for name in names]
    if args.peak_tflops is None or args.bandwidth is None:
        raise InputError("--peak-tflops and --bandwidth go together: give both (dense bf16 TFLOP/s and HBM TB/s)")
    if args.peak_tflops <= 0 or args.bandwidth <= 0:
        raise InputError(f"--peak-tflops and --bandwidth must be positive, got {args.peak_tflops:g} "
                         f"and {args.bandwidth:g}")
    return [DeviceSpec(f"{args.peak_tflops:g} TFLOP/s {args.bandwidth:g} TB/s", args.peak_tflops, args.bandwidth,
                       "given with --peak-tflops and --bandwidth")]


def roofline_main(args: argparse.Namespace, names: list[str]) -> int:
    """`ran-bench profile --roofline`: the roofline of each model on each device, as a table or JSON."""
    if args.output:
        raise InputError("--output writes the model-zoo table; with --roofline use --json > FILE")
    if args.batch is not None and args.batch < 1:
        raise InputError(f"--batch must be >= 1, got {args.batch}")
    devices = roofline_devices(args)
    rooflines = [roofline(name, args.size, args.batch, device) for name in names for device in devices]
    if args.json:
        print(json.dumps({"convention": ROOFLINE_CONVENTION, "rooflines": [r.to_dict() for r in rooflines]}, indent=2))
    else:
        print(format_roofline(rooflines))
    return 0


def main(args: argparse.Namespace) -> int:
    known = list_models("imagenet") + list_models("cifar")
    roofline_only = [flag for flag, value in (("--device", args.device), ("--peak-tflops", args.peak_tflops),
                                               ("--bandwidth", args.bandwidth), ("--batch", args.batch))
                     if value is not None]
    if roofline_only and not args.roofline:
        verb = "applies" if len(roofline_only) == 1 else "apply"
        raise InputError(f"{', '.join(roofline_only)} {verb} only with --roofline")
    default = [r["model"] for r in load_table("table7_imagenet")] if args.roofline else known
    names = default if not args.models else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names:
        raise InputError("--models names no model; give e.g. --models attention56,attention92")
    if unknown:
        raise InputError(f"unknown model(s) {', '.join(unknown)} in --models; known: {', '.join(known)}")
    if args.size is not None and args.size < 32:
        raise InputError(f"--size {args.size} is too small for an ImageNet model (stride 32); use e.g. 224, 299 or 320")
    if args.roofline:
        return roofline_main(args, names)
    profiles = [profile_model(name, args.size) for name in names]
    if args.json:
        print(json.dumps({"mac_convention": MAC_CONVENTION, "notes": NOTES, "models": profiles}, indent=2))
    else:
        print(format_text(profiles))
    if args.output:
        path = Path(args.output)
        command = " ".join(["ran-bench profile", *(["--models", args.models] if args.models else []),
                             *(["--size", str(args.size)] if args.size else []), "--output", args.output])
        with atomic_write(path) as f:
            f.write(format_markdown(profiles, command))
        print(f"wrote {path}", file=sys.stderr)
    return 0
