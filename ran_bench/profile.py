"""Parameters and multiply-adds of the model zoo, beside the paper's figures (`ran-bench profile`).

Multiply-adds are counted with PyTorch's maintained counter, `torch.utils.flop_counter`, which
counts the FLOPs of convolutions and matrix products (linear layers) only; one multiply-add is two
FLOPs, so MACs = FLOPs / 2. BatchNorm, activations, pooling, upsampling and the attention
products are not counted: that is the paper's convention (convolutions and the classifier).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from ran_bench.errors import InputError
from ran_bench.fileio import atomic_write
from ran_bench.models import create_model, list_models, model_info
from ran_bench.paper import load_table, released_definition, table7_row

MAC_CONVENTION = (
    "multiply-adds (MACs) of one forward pass of one image = FLOPs / 2 counted by "
    "torch.utils.flop_counter: convolutions and matrix products (classifier) only, as in the paper"
)


def count_params(model: nn.Module) -> int:
    """Number of learnable parameters (BatchNorm counts 2 per channel: weight and bias)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, input_size: int | tuple[int, ...]) -> int:
    """Multiply-adds of one forward pass of one image of side `input_size` (or shape (C, H, W)).

    The model is run once in eval mode under `FlopCounterMode`; its train/eval mode is restored.
    """
    shape = (3, input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, *shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


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
           "| " + " | ".join(headers) + " |",
           "|" + "|".join("---:" if 1 < i < len(headers) - 1 else "---" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    out += ["", *(f"- {note}" for note in NOTES), ""]
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, metavar="A,B",
                        help="comma-separated model names (default: every registered model)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"input side for ImageNet models (default {PAPER_MAC_SIZE}, where the paper counts "
                             f"FLOPs); CIFAR models always use {CIFAR_SIZE}")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--output", default=None, metavar="FILE.md",
                        help="also write the table as markdown, e.g. reports/model_zoo.md")


def main(args: argparse.Namespace) -> int:
    known = list_models("imagenet") + list_models("cifar")
    names = known if not args.models else [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names:
        raise InputError("--models names no model; give e.g. --models attention56,attention92")
    if unknown:
        raise InputError(f"unknown model(s) {', '.join(unknown)} in --models; known: {', '.join(known)}")
    if args.size is not None and args.size < 32:
        raise InputError(f"--size {args.size} is too small for an ImageNet model (stride 32); use e.g. 224, 299 or 320")
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
