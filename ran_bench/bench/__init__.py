"""Throughput, MFU, scaling and overhead benchmarks (`ran-bench bench`).

Modes:
- `train`: the trainer's own step (`ran_bench.recipe.train_step` on an Accelerate-prepared model and
  optimizer, with the trainer's loss and optimizer) on synthetic batches already on the device: the
  model-only rate. With `--data-root`, also the end-to-end rate with the real loader, and which of
  the two limits. With `--overhead`, also a bare PyTorch loop and timm's benchmark recipe on the
  same pre-made batches, as step-time ratios. What is compared is `train_step` alone (autocast,
  loss, backward, optimizer step, zero_grad through Accelerate), not the training loop around it
  (gradient accumulation context, learning-rate scheduler, metrics, the stop vote). With
  `--profile`, a torch.profiler trace of a few more steps and their time by op kind.
- `infer`: forward passes of the model in eval mode under `torch.inference_mode`.
- `data`: the input pipeline alone: `--repeats` timed regions of `--steps` batches of the loader
  after `--warmup` batches, on `--data-root` or on generated ImageNet-sized JPEGs.
- `scaling`: `train` under torchrun with 1, 2, ... processes: images/s per process and efficiency.
- `readme`: regenerate `reports/bench/README.md` from `results.csv` (optionally adding the rows of
  other CSV files first, e.g. the ones `scripts/gpu_bench.sh` wrote on a GPU machine).

Timing: `--warmup` untimed steps, then `--repeats` timed regions of `--steps` steps each. Every
timed region starts and ends with `ran_bench.runtime.synchronize(device)`, so work queued on a GPU
is counted in the region it belongs to. Figures are the median over the repeats, with min and max.

Conventions, written into every record: FLOPs = 2 x multiply-adds, counted by
`ran_bench.models.count_macs` (convolutions and matrix products, the paper's convention); a
training step costs 3 x the forward FLOPs (the backward pass ~ 2 x the forward); inference costs
1 x. Achieved TFLOP/s and MFU are per process (per device); MFU is against the bf16/fp16 dense
peak of the device, given with `--peak-tflops` or looked up by GPU name for bf16/fp16 runs. A
training row on a GPU of `ran_bench.roofline.DEVICES` also gives % of roofline: images/s over the
unfused roofline's images/s of the same model, size and batch (`ran_bench.roofline`).

Layout, each module importing only the ones above it:
- `timing`: timed regions (`time_steps`, `Timing`), peak memory, the loader-or-model verdict.
- `flops`: FLOPs per image, achieved TFLOP/s, MFU and the GPU peak table; a GPU row's roofline.
- `record`: `BenchRecord` (one JSON file, one row of results.csv), its environment, CSV and JSON.
- `rates`: the recorded training rates of results.csv and what a schedule costs at them
  (`ran-bench report`'s "to reproduce" table, `ran-bench train`'s start-up line).
- `readme`: `reports/bench/README.md` rendered from the rows of results.csv.
- `steps`: the models, batches and step functions the modes time (trainer, bare loop, timm).
- `profiling`: `--profile`'s trace and its self time by the roofline's op kinds.
- `options`: resolved defaults of the flags and the command line that repeats a measurement.
- `modes`: `run_train`, `run_infer`, `run_data`, `run_scaling`.
- `command`: `main(args)` of `ran-bench bench` (the arguments are declared in `ran_bench.cli`),
  saving records, the printed summary and the `readme` mode (which gives GPU training rows recorded
  without one their roofline).
"""

from ran_bench.errors import UserError


class BenchError(ValueError, UserError):
    """A benchmark that cannot run as asked (the message names the flag to change)."""
