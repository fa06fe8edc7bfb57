"""The `ran-bench` command line: every command's arguments, then the command's `main(args)`.

The arguments of all commands are declared here, so that `ran-bench --help` and
`ran-bench COMMAND --help` answer without importing torch; the chosen command's module (which
does) is imported only to run it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from ran_bench import __version__
from ran_bench.errors import UserError
from ran_bench.fileio import REPO
from ran_bench.preemption import stop_request

OVERRIDES_HELP = "config overrides, e.g. data.root=/data/imagenet optim.global_batch_size=512"


def train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config, e.g. configs/attention92.yaml (default when resuming: "
                                         "RUN_DIR/config.yaml)")
    parser.add_argument("--run-dir", help="run directory (default: runs/<config file name>); a directory "
                                          "with checkpoints is resumed")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory (its newest good checkpoint) or a checkpoint file")
    parser.add_argument("--size", type=int, action="append",
                        help="test size in pixels, repeatable (default: the config's data.test_sizes)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.root=/data/imagenet eval.batch_size=50")


def report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories written by `ran-bench train` (results.json, config.yaml, metrics.jsonl)")
    parser.add_argument("-o", "--output", default="reports/imagenet.md",
                        help="markdown file to write; plots go next to it (default: %(default)s)")
    parser.add_argument("--bench-csv", type=Path,
                        help="the results.csv whose `bench train` rows price each Table 7 row (default: "
                             "$RAN_BENCH_RESULTS_CSV, else reports/bench/results.csv of this checkout)")


def visualize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint file (RUN/checkpoints/step_*.pt) or a run directory (its newest checkpoint)")
    parser.add_argument("--image", required=True, help="image file to look at (any format PIL reads)")
    parser.add_argument("-o", "--output", default="attention_masks.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--config", help="a config.yaml to build the model from (default: the config the "
                                         "checkpoint holds)")
    parser.add_argument("--size", type=int, help="input crop size (default: the run's data.test_sizes[0])")


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run directory (its newest good checkpoint) or a checkpoint file")
    parser.add_argument("out", metavar="OUT_DIR",
                        help="new (or empty) folder: model.safetensors, config.json (timm's) and README.md (a model "
                             "card from the run's results.json)")
    parser.add_argument("--push-to-hub", metavar="REPO",
                        help="then upload the folder to this Hugging Face Hub model repo (created if needed; "
                             "needs a login: `hf auth login` or HF_TOKEN)")


def predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="CHECKPOINT_OR_EXPORT",
                        help="a run directory (its newest good checkpoint), a checkpoint file or an export folder")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    parser.add_argument("--top", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--size", type=int, help="input crop size (default: the run's data.test_sizes[0])")
    parser.add_argument("--json", action="store_true", help="one JSON object per image instead of text")


def submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config, e.g. configs/attention92.yaml")
    parser.add_argument("--nodes", type=int, default=1, help="number of nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8,
                        help="GPUs per node, one training process each (default 8); 0 for a CPU job")
    parser.add_argument("--tasks-per-node", type=int,
                        help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    parser.add_argument("--cpus-per-task", type=int,
                        help="CPU cores per process, for data decoding (default 8 with GPUs, 1 without)")
    parser.add_argument("--partition", help="SLURM partition (default: the cluster's default partition)")
    parser.add_argument("--time", default="72:00:00",
                        help="time limit per job attempt: minutes, HH:MM:SS or D-HH:MM:SS (default 72:00:00); "
                             "the job checkpoints and requeues itself before it")
    parser.add_argument("--run-dir",
                        help="run directory (default runs/<config name>); an existing one is resumed. Logs of "
                             "the SLURM tasks go to RUN_DIR/submitit/")
    parser.add_argument("--name", help="SLURM job name (default ran-bench-<config name>)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help="another submitit SLURM parameter, e.g. --slurm account=proj --slurm qos=high "
                             "--slurm constraint=a100 (repeatable)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the executor parameters and the command each task runs; submit nothing")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)


def profile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, metavar="A,B",
                        help="comma-separated model names (default: every registered model; with --roofline, "
                             "Table 7's)")
    parser.add_argument("--size", type=int, default=None,
                        help="input side for ImageNet models (default 224, where the paper counts FLOPs); CIFAR "
                             "models always use 32. With --roofline: every model's input side (default: the "
                             "side its recipe trains at)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--output", default=None, metavar="FILE.md",
                        help="also write the table as markdown, e.g. reports/model_zoo.md")
    parser.add_argument("--roofline", action="store_true",
                        help="instead: the unfused roofline of one training step (FLOPs and bytes per trained "
                             "image per op kind, images/s at the device's limits), counted on the meta device; "
                             "default models: Table 7's, at their training size")
    parser.add_argument("--device", default=None, metavar="NAME[,NAME]",
                        help="with --roofline: device(s) of the data-sheet table, a100, h100, h200 or b200 "
                             "(default h100)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="with --roofline, instead of --device: dense bf16 peak in TFLOP/s")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="with --roofline, instead of --device: memory bandwidth in TB/s")
    parser.add_argument("--batch", "--batch-size", dest="batch", type=int, default=None,
                        help="with --roofline: images per step (default: the recipe's per-device batch, 32)")


def bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mode", choices=("train", "infer", "data", "scaling", "readme"),
                        help="train: the trainer's step; infer: forward only; data: the input pipeline alone; "
                             "scaling: train with 1, 2, ... processes; readme: regenerate README.md from results.csv")
    parser.add_argument("--model", help="registered model name (see `ran-bench profile`)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per step and process (default 32)")
    parser.add_argument("--size", type=int, help="image side (default: the model's input size; 224 for data)")
    parser.add_argument("--precision", help="fp32, or bf16/fp16 autocast (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and images")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (timing after warm-up)")
    parser.add_argument("--backend", choices=("dali", "torchvision", "synthetic"), default="dali",
                        help="loader of --data-root for the end-to-end rate (train) or the data mode; "
                             "dali falls back to torchvision when DALI is not installed (the row records "
                             "the loader that ran)")
    parser.add_argument("--data-root", type=Path,
                        help="ImageNet-layout folder (ROOT/train/<wnid>/*.JPEG): train also measures the "
                             "end-to-end rate with the real loader and says which one limits; data times "
                             "--steps batches of it per repeat (default for data: 400 generated "
                             "ImageNet-sized JPEGs)")
    parser.add_argument("--num-threads", type=int, help="decoding threads (DALI) or workers (torchvision)")
    parser.add_argument("--steps", type=int, default=20,
                        help="steps (data: loader batches) per timed repeat (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps (data: batches, covering pipeline build and worker start) first "
                             "(default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; median and min-max (default 3)")
    parser.add_argument("--peak-tflops", type=float,
                        help="peak TFLOP/s of one device for MFU (default: bf16/fp16 data-sheet peak by GPU name)")
    parser.add_argument("--overhead", action="store_true",
                        help="train: also time a bare PyTorch loop and timm's benchmark recipe on the same "
                             "pre-made batches and print step-time ratios of the trainer's train_step (not the "
                             "loop around it) over them; timm's only when timm builds the same model")
    parser.add_argument("--profile", action="store_true",
                        help="train: after the timed runs, trace 3 more steps (after 2 warm-up steps) with "
                             "torch.profiler, write OUT_DIR/<name>.pt.trace.json (open it in Perfetto or "
                             "TensorBoard) and print self time by op kind, the kinds of `ran-bench profile "
                             "--roofline`")
    parser.add_argument("--procs", help="scaling: comma-separated process counts (default 1,2 on CPU; "
                                        "1,2,4,8 up to the GPU count on CUDA)")
    parser.add_argument("--out-dir", type=Path, default=REPO / "reports" / "bench",
                        help="where the JSON goes and results.csv/README.md are updated (default reports/bench)")
    parser.add_argument("--json", type=Path, help="write the JSON here instead of OUT_DIR/<name>.json")
    parser.add_argument("--no-record", action="store_true", help="write the JSON only, no results.csv row")
    parser.add_argument("--add", type=Path, nargs="*", default=[],
                        help="readme: append the rows of these results.csv files (e.g. from a GPU machine) first")
    parser.add_argument("--expect-world-size", type=int, help=argparse.SUPPRESS)  # set by scaling


def data_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    p = sub.add_parser("prepare-val", help="move the flat ILSVRC2012 validation images into class folders")
    p.add_argument("val_dir", help="folder with ILSVRC2012_val_*.JPEG (becomes VAL_DIR/<wnid>/*.JPEG)")
    p.add_argument("--ground-truth", required=True,
                   help="LOC_val_solution.csv, or the devkit's ILSVRC2012_validation_ground_truth.txt "
                        "(then --synsets is needed)")
    p.add_argument("--synsets", help="the devkit's ILSVRC2012_ID -> wnid table (meta.mat order) as text: "
                                     "one wnid per line in ID order, or 'ID wnid' lines")
    p.add_argument("--dry-run", action="store_true", help="count what would be moved, move nothing")

    p = sub.add_parser("verify", help="scan a dataset: images per class, class mismatches, odd files and what "
                                      "each loader does with them")
    p.add_argument("root", help="dataset root with train/<wnid>/ and val/<wnid>/")
    p.add_argument("--splits", nargs="+", default=["train", "val"])
    p.add_argument("--num-classes", type=int, help="expected number of classes (1000 for ImageNet-1K)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--no-dali", action="store_true",
                   help="judge what the DALI loader does by each file's format instead of decoding every file "
                        "with DALI as well (faster; the only way when DALI is not installed)")
    p.add_argument("--json", help="also write the report as JSON to this file")

    p = sub.add_parser("make-demo", help="generate the small demo dataset (shapes in 10 classes)")
    p.add_argument("out", nargs="?", default="data/demo", help="output folder (default: data/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--min-side", type=int, default=80)
    p.add_argument("--max-side", type=int, default=160)
    p.add_argument("--workers", type=int, default=1,
                   help="processes writing images (default 1; the images are the same for any number)")
    p.add_argument("--odd-files", action="store_true",
                   help="also write a grayscale, a CMYK, a PNG-named-.JPEG, a truncated JPEG and a text "
                        "file into the first class of each split (for testing loaders and verify)")

    p = sub.add_parser("cifar", help="convert the official CIFAR-10/100 python archive into class folders of PNGs",
                       description="Convert cifar-10-python.tar.gz or cifar-100-python.tar.gz (download them "
                                   "from https://www.cs.toronto.edu/~kriz/cifar.html) into OUT/train/<label>_<name>/"
                                   "*.png and OUT/val/<label>_<name>/*.png (the test set), lossless 32x32 PNGs; "
                                   "folder order is the official label order.")
    p.add_argument("archive", help="cifar-10-python.tar.gz or cifar-100-python.tar.gz (CIFAR-10 vs 100 is "
                                   "detected from its members)")
    p.add_argument("out", help="new or empty output folder (e.g. data/cifar10, the configs' data.root)")
    p.add_argument("--workers", type=int, default=None, help="PNG-writing processes (default: all cores)")


# name -> (module with `main(args)`, one-line help, its arguments)
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {
    "profile": ("ran_bench.profile", "parameters and multiply-adds of every model beside the paper's; the "
                "roofline of a training step", profile_arguments),
    "data": ("ran_bench.data.cli", "prepare, verify, generate and convert (CIFAR) datasets in the ImageNet layout",
             data_arguments),
    "train": ("ran_bench.train", "train a model from a YAML config (single process, accelerate or torchrun)",
              train_arguments),
    "eval": ("ran_bench.evaluate", "single-crop top-1/top-5 error of a run or checkpoint", eval_arguments),
    "report": ("ran_bench.report", "markdown report of runs beside the paper's tables", report_arguments),
    "visualize": ("ran_bench.visualize", "soft attention masks of each stage over an image", visualize_arguments),
    "export": ("ran_bench.export", "a run's model as a timm / Hugging Face Hub folder with a model card",
               export_arguments),
    "predict": ("ran_bench.predict", "top-5 classes of images with a run's or an export's model", predict_arguments),
    "submit": ("ran_bench.submit", "submit a training run to SLURM with submitit", submit_arguments),
    "bench": ("ran_bench.bench.command", "throughput, MFU, scaling and overhead benchmarks", bench_arguments),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ran-bench", description="Residual Attention Network reproduction and "
                                                                   "benchmarks.")
    parser.add_argument("--version", action="version", version=f"ran-bench {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        # Top-level help, --version, or an unknown command: argparse prints the right message.
        _parser().parse_args(argv)
        return 2
    name, rest = argv[0], argv[1:]
    if name == "train":
        stop_request()  # before the seconds of importing torch: a scheduler's SIGTERM then is not lost
    module_name, help_text, add_arguments = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"ran-bench {name}", description=help_text)
    add_arguments(parser)
    try:
        # Intermixed: `eval RUN --size 320 data.root=X` mixes options and key=value overrides.
        args = parser.parse_intermixed_args(rest)
    except TypeError:
        # argparse cannot intermix for commands with sub-commands (`ran-bench data make-demo ...`).
        args = parser.parse_args(rest)
    try:
        return int(importlib.import_module(module_name).main(args) or 0)
    except UserError as e:  # bad input: one line naming the problem and the fix, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
