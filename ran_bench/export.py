"""`ran-bench export RUN_DIR_OR_CHECKPOINT OUT_DIR`: a trained model in the folder layout of timm
and the Hugging Face Hub, written by timm's own `save_for_hf`.

OUT_DIR gets three files:
- `model.safetensors`: the weights (tensors only, no pickles);
- `config.json`: timm's model config (architecture, num_classes, label_names and, for ImageNet
  wnids, label_descriptions, model_args, and the pretrained config: input size, crop,
  interpolation, mean/std, first conv and classifier), plus a `ran_bench` block with the run's
  resolved YAML config and step, so `ran-bench eval` and `predict` rebuild exactly the trained model;
- `README.md`: a model card stating only what the run recorded (see `model_card`).

`timm.create_model("local-dir:OUT_DIR", pretrained=True)` (after `import ran_bench.models`) builds
the model with these weights; every export is checked to give the trained model's outputs exactly
that way before OUT_DIR appears. Where timm registers another network under the same name
(`resnet200`: timm's is post-activation), config.json names the timm architecture and arguments
that build ours (`TIMM_ARCHITECTURES`). The folder is built as a hidden sibling and renamed to
OUT_DIR at the end: a failed export leaves no OUT_DIR behind.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn as nn
from timm.models import save_for_hf

from ran_bench import __version__
from ran_bench.checkpoint import Checkpoint, find_checkpoint
from ran_bench.config import Config, config_from_yaml
from ran_bench.data import MEAN_255, STD_255
from ran_bench.data.torchvision_loader import CROP_FRACTION
from ran_bench.fileio import storage_errors
from ran_bench.markdown import table
from ran_bench.report.cells import DASH, duration, options_text, percent
from ran_bench.report.runs import FULL_TEST_IMAGES, MODEL_OPTION_DEFAULTS, PAPER_DATASET_CLASSES, Run
from ran_bench.results import Evaluation, Results, ResultsError, load_results, run_results
from ran_bench.weights import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    WEIGHTS_FILE,
    ExportError,
    build_model,
    class_names,
    describe_classes,
)

CARD_FILE = "README.md"
PAPER = "Residual Attention Network for Image Classification"
PAPER_ID = "arXiv:1704.06904"
# ran-bench models whose name timm gives to another network: the timm architecture and
# arguments that build ours, and what to tell the reader.
TIMM_ARCHITECTURES = {
    "resnet200": ("resnetv2_50", {"layers": [3, 24, 36, 3]},
                  "timm's own `resnet200` is a post-activation ResNet-200 that these weights do not fit; ran-bench's "
                  "is timm's pre-activation ResNetV2 with (3, 24, 36, 3) units, which config.json builds as "
                  "`resnetv2_50` with `layers=[3, 24, 36, 3]`"),
}

log = logging.getLogger("ran_bench.export")


# config.json


def _layer_names(model: nn.Module, num_classes: int) -> dict[str, str]:
    """timm's first_conv and classifier: the first convolution and the final linear layer."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    out = {"first_conv": convs[0]} if convs else {}
    if linears and linears[-1][1].out_features == num_classes:
        out["classifier"] = linears[-1][0]
    return out


def pretrained_cfg(cfg: Config, model: nn.Module, num_classes: int) -> dict:
    """timm's pretrained config of the run's weights: its sizes and validation transform."""
    size, test = cfg.data.train_size, cfg.data.test_sizes[0]
    out = {
        "architecture": TIMM_ARCHITECTURES.get(cfg.model.name, (cfg.model.name,))[0],
        "input_size": (3, size, size), "interpolation": "bilinear", "crop_mode": "center",
        # the CIFAR recipe tests the native image (shorter side to the size, centre crop): crop 1.0
        "crop_pct": 1.0 if cfg.data.augmentation == "cifar" else CROP_FRACTION,
        "mean": tuple(round(m / 255, 6) for m in MEAN_255), "std": tuple(round(s / 255, 6) for s in STD_255),
        "num_classes": num_classes, **_layer_names(model, num_classes),
        "paper_name": PAPER, "paper_ids": PAPER_ID}
    if test != size:
        out["test_input_size"] = (3, test, test)
    return out


def save_timm_folder(folder: Path, model: nn.Module, cfg: Config, ckpt: Checkpoint, ckpt_path: Path) -> dict:
    """Write model.safetensors and config.json into `folder` with timm's `save_for_hf`; returns the config."""
    labels, label_source = class_names(cfg, ckpt.num_classes)
    extra = {"ran_bench": {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "model": cfg.model.name,
                           "model_options": dict(cfg.model.options), "step": ckpt.step, "checkpoint": str(ckpt_path),
                           "label_source": label_source, "ran_bench_version": __version__, "config": ckpt.config}}
    if labels:
        extra["label_names"] = labels
        descriptions = describe_classes(labels)
        if descriptions:
            extra["label_descriptions"] = dict(zip(labels, descriptions))
    # save_for_hf reads the attributes timm's models carry; ran-bench's own models lack some
    if not hasattr(model, "num_classes"):
        model.num_classes = ckpt.num_classes
    if not hasattr(model, "num_features"):
        model.num_features = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].in_features
    model.pretrained_cfg = pretrained_cfg(cfg, model, ckpt.num_classes)
    model_args = {**TIMM_ARCHITECTURES.get(cfg.model.name, ("", {}))[1], **cfg.model.options}
    save_for_hf(model, str(folder), model_config=extra, model_args=model_args, safe_serialization=True)
    return json.loads((folder / CONFIG_FILE).read_text())


def check_timm_loads(folder: Path, model: nn.Module, config: dict) -> None:
    """ExportError unless `timm.create_model("local-dir:folder", pretrained=True)` gives exactly
    the outputs of `model`: the claim the model card makes."""
    size = config["pretrained_cfg"]["input_size"]
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    why = "different outputs"
    try:
        loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError, KeyError, TypeError ... for a misfit
        loaded, why = None, f"{type(e).__name__}: {str(e).splitlines()[0]}"
    with torch.no_grad():
        if loaded is not None and torch.equal(loaded(x), model(x)):
            return
    raise ExportError(f"timm cannot load this export of {config['ran_bench']['model']} as the trained model "
                      f"(timm.create_model('{config['architecture']}') with its config.json: {why}); "
                      "TIMM_ARCHITECTURES in ran_bench/export.py needs an entry for it")


# The model card


def card_record(run_dir: Path | None, ckpt_path: Path, ckpt: Checkpoint, cfg: Config) -> tuple[Results, str]:
    """(the record of the checkpoint's weights, where its evaluations come from or why it has none):
    the run's results.json when it records this checkpoint's step; otherwise the same record built
    from the checkpoint (which holds the training facts), with the evaluations `ran-bench eval`
    stored for this step in RUN_DIR/evals/, and no git commit (only results.json records one)."""
    why = "the checkpoint is outside a run directory"
    if run_dir is not None:
        try:
            results = load_results(run_dir)
        except ResultsError:
            why = "the run has no readable results.json"
        else:
            if results.steps == ckpt.step:
                results.evaluations = [e for e in results.evaluations if e.step == ckpt.step]
                return results, "the run's results.json" if results.evaluations else "the run's results.json has none"
            why = f"the run's results.json records step {results.steps:,}, not this checkpoint's"
    evaluations, stored = _stored_evaluations(run_dir, ckpt.step)
    results = run_results(
        cfg, num_classes=ckpt.num_classes, params=ckpt.params, macs=ckpt.macs, macs_input_size=ckpt.macs_input_size,
        step=ckpt.step, images_seen=ckpt.images_seen, epochs=ckpt.epochs, world_size=ckpt.world_size,
        device_type=ckpt.device_type, device_name=ckpt.device_name, precision=ckpt.precision,
        wall_time_s=ckpt.elapsed_s, device_seconds=ckpt.device_seconds, evaluations=evaluations,
        skipped_images=len(ckpt.skipped_files))
    results.git_commit = ""
    return results, f"the run's {stored.relative_to(run_dir)}" if evaluations else why


def _stored_evaluations(run_dir: Path | None, step: int) -> tuple[list[Evaluation], Path | None]:
    """What `ran-bench eval` recorded of an older checkpoint on the run's data, and the file:
    RUN_DIR/evals/step_XXXXXXXX.json."""
    path = run_dir / "evals" / f"step_{step:08d}.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return [], None
    try:
        return [Evaluation(**e) for e in json.loads(path.read_text())["evaluations"]], path
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: not a readable record of evaluations ({e}); move it aside to export "
                          "without it") from None


def _warnings(run: Run) -> list[str]:
    """What makes the weights not a reproduction of the paper's, each said plainly."""
    r, lines = run.results, []
    if r.partial:
        lines.append(f"**Partial run.** Training stopped at step {r.steps:,} of the {r.total_steps:,} steps of its "
                     f"schedule ({percent(r.steps / r.total_steps)}); these are not the weights of a finished run.")
    if run.dataset not in PAPER_DATASET_CLASSES:
        lines.append(f"**Not the paper's data.** Trained on `{r.dataset}` ({r.num_classes} classes), not ImageNet-1K, "
                     "CIFAR-10 or CIFAR-100: its errors are not comparable with the paper's tables.")
    elif run.schedule_share is not None and run.schedule_share < 1:
        lines.append(f"**Short of the paper's schedule.** It saw {r.images_seen:,} training images, "
                     f"{percent(run.schedule_share)} of the paper's schedule: not a reproduction of its numbers.")
    if run.dataset in ("cifar10", "cifar100") and run.augmentation != "cifar":
        lines.append("**Not the paper's CIFAR recipe.** Trained with the ImageNet augmentation.")
    if r.label_noise:
        lines.append(f"**Noisy labels.** {r.label_noise:.0%} of the training labels were changed to another class.")
    return [text for line in lines for text in (f"> {line}", "")]


def _results_section(run: Run, source: str) -> list[str]:
    r = run.results
    if not r.evaluations:
        return ["## Measured results", "",
                f"**Not evaluated.** No evaluation of these weights (step {r.steps:,}) is recorded ({source}). "
                "`ran-bench eval` on the run directory, or `ran-bench eval THIS_FOLDER data.root=...`, measures one.",
                ""]
    full = FULL_TEST_IMAGES.get(run.dataset)
    rows = [[f"{e.size}x{e.size}", f"{e.top1_err:.2f}", f"{e.top5_err:.2f}",
             f"{e.num_samples:,}" + (f" of {full:,}" if full and e.num_samples != full else "")
             + (f" ({e.skipped_images:,} unreadable)" if e.skipped_images else ""),
             f"{e.device_name or DASH} ({e.device_type or '?'})", e.precision or DASH] for e in r.evaluations]
    return ["## Measured results", "",
            f"Single centre-crop error of step {r.steps:,} on the validation images of `{r.dataset}` "
            f"(`{r.data_root}`), as recorded in {source}:", "",
            *table(["test size", "top-1 error (%)", "top-5 error (%)", "images", "evaluated on", "precision"],
                   rows, right={1, 2, 3}), ""]


def _training_section(run: Run, ckpt_path: Path) -> list[str]:
    r = run.results
    share = f"; {percent(run.schedule_share)} of the paper's schedule" if run.schedule_share is not None else ""
    gpu = f", {r.gpu_hours:.2f} GPU-hours" if r.device_type == "cuda" else ""
    noise = f", label noise {r.label_noise:g}" if r.label_noise else ""
    rows = [
        ["data", f"`{r.dataset}`, {r.num_classes} classes, {r.augmentation} augmentation{noise} (`{r.data_root}`)"],
        ["schedule", f"step {r.steps:,} of {r.total_steps:,} ({'partial' if r.partial else 'complete'}), global "
                     f"batch {r.global_batch_size}, {r.images_seen:,} images ({r.epochs:.2f} epochs){share}"],
        ["hardware", f"{r.world_size} x {r.device_name} ({r.device_type}), {duration(r.wall_time_s)} wall time{gpu}"],
        ["precision", r.precision],
        ["model", f"{r.params:,} parameters, {r.macs / 1e9:.2f} G multiply-adds at {r.macs_input_size}x"
                  f"{r.macs_input_size}; options: {options_text(run)}"],
        ["weights", f"`{ckpt_path.name}` (step {r.steps:,})"],
        ["code", f"git commit `{r.git_commit}`" if r.git_commit else "git commit not recorded (only the run's "
                                                                      "results.json of this step records it)"],
    ]
    return ["## How it was trained", "", *table(["", ""], rows), ""]


def _use_section(cfg: Config, config: dict) -> list[str]:
    crop = ("shorter side to the test size, centre crop (the native image for 32x32 inputs)"
            if cfg.data.augmentation == "cifar" else "shorter side to size / 0.875 (256 for 224), centre crop")
    n = config["num_classes"]
    args = "".join(f", {k}={v!r}" for k, v in config.get("model_args", {}).items() if k != "num_classes")
    lines = ["## Use", "", "```python", "import timm", "",
             "import ran_bench.models  # registers ran-bench's models with timm", "",
             "# config.json gives the architecture, its arguments, the classes and the transform",
             'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True).eval()',
             f'# or: timm.create_model("{config["architecture"]}", pretrained=True, num_classes={n}{args},',
             f'#         pretrained_cfg_overlay=dict(file="PATH/TO/THIS/FOLDER/model.safetensors", num_classes={n}))',
             "```", ""]
    if cfg.model.name in TIMM_ARCHITECTURES:
        lines += [f"Note: {TIMM_ARCHITECTURES[cfg.model.name][2]}.", ""]
    return lines + [
        "```bash", "ran-bench predict THIS_FOLDER image.jpg        # top-5 classes",
        "ran-bench eval THIS_FOLDER data.root=PATH/TO/DATA  # ROOT/val/<class>/*: the run's classes", "```", "",
        f"Validation transform: {crop}, bilinear, ImageNet mean/std; test size "
        f"{', '.join(str(s) for s in cfg.data.test_sizes)}.", ""]


def model_card(cfg: Config, results: Results, source: str, ckpt_path: Path, config: dict) -> str:
    """README.md of the export (`config`: its config.json): the run's recorded facts and measured
    errors, and nothing else. It says plainly when the run is partial, short of the paper's
    schedule or on other data, and that the weights are not evaluated when no evaluation of their
    step is recorded."""
    run = Run(path=ckpt_path, label=cfg.model.name, results=results,
              options={**MODEL_OPTION_DEFAULTS, **cfg.model.options}, train_metrics=[], eval_metrics=[])
    lines = ["---", "library_name: timm", "tags:", "- image-classification", "- timm", "- ran-bench", "---", "",
             f"# {cfg.model.name}: `{results.dataset}`, step {results.steps:,}", "",
             f"`{cfg.model.name}` as ran-bench builds it for the tables of Wang et al., \"{PAPER}\" (CVPR 2017, "
             f"{PAPER_ID}), with the weights of one ran-bench training run, exported by `ran-bench export` from "
             f"`{ckpt_path.name}`. They are not weights released by the paper's authors (who released none).", ""]
    lines += _warnings(run)
    lines += _results_section(run, source)
    lines += _training_section(run, ckpt_path)
    lines += _use_section(cfg, config)
    return "\n".join(lines)


# Writing


def check_out_dir(out: Path) -> None:
    """Refuse an OUT_DIR that is a file or a non-empty folder: an export never mixes with other files."""
    if out.is_dir() and any(out.iterdir()):
        raise ExportError(f"{out} exists and is not empty; choose a new folder or delete it first")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder; choose a new folder")


def write_export(source: str | os.PathLike, out: str | os.PathLike,
                 warn: Callable[[str], None] = log.warning) -> tuple[Path, dict]:
    """Export the checkpoint of `source` (a run directory's newest, or a checkpoint file) to `out`;
    returns (`out`, the config.json written)."""
    out = Path(out)
    check_out_dir(out)
    ckpt_path, ckpt, run_dir = find_checkpoint(source, warn=warn)
    cfg = config_from_yaml(ckpt.config, f"{ckpt_path} (embedded config)")
    model = build_model(cfg, ckpt.num_classes, ckpt.model, ckpt_path)
    record = card_record(run_dir, ckpt_path, ckpt, cfg)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    with storage_errors(f"write {out}"):
        tmp.mkdir(parents=True)
        try:
            config = save_timm_folder(tmp, model, cfg, ckpt, ckpt_path)
            # safetensors creates its file 0600 whatever the umask; give it config.json's mode
            (tmp / WEIGHTS_FILE).chmod((tmp / CONFIG_FILE).stat().st_mode & 0o777)
            (tmp / CARD_FILE).write_text(model_card(cfg, *record, ckpt_path, config))
            check_timm_loads(tmp, model, config)
            tmp.replace(out)  # replaces an empty OUT_DIR too
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out, config


def push_to_hub(folder: Path, repo: str) -> str:
    """Upload the export folder to the Hub model repo `repo` (created if needed) with
    huggingface_hub's upload, as timm's `push_to_hf_hub` does; returns the commit's URL. Needs a
    login. Not `push_to_hf_hub` itself: it saves the model again and would drop this model card."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ExportError(f"--push-to-hub needs huggingface_hub: pip install huggingface_hub (the export in {folder} "
                          "is complete)") from None
    try:
        api = HfApi(library_name="timm", library_version=timm.__version__)
        repo_id = api.create_repo(repo, repo_type="model", exist_ok=True).repo_id
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"ran-bench export of {folder.name}")
    except Exception as e:  # noqa: BLE001 - network, login and Hub errors come in many types
        raise ExportError(f"upload of {folder} to {repo} failed ({type(e).__name__}: {e}); the export is complete, "
                          f"upload it again with --push-to-hub or `hf upload {repo} {folder}`") from None
    return str(getattr(commit, "commit_url", commit))


def main(args: argparse.Namespace) -> int:
    out, config = write_export(args.path, args.out, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    block = config["ran_bench"]
    print(f"wrote {out}: {WEIGHTS_FILE}, {CONFIG_FILE}, {CARD_FILE} ({block['model']} step {block['step']}, "
          f"{config['num_classes']} classes; class names: {block['label_source']}; loads in timm as "
          f"{config['architecture']} with identical outputs)")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(out, args.push_to_hub)}")
    return 0
