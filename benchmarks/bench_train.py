"""Training throughput of adm's real training step (`adm.training.loop.Trainer.train_step`: forward,
hybrid loss, backward, AdamW, EMA, loss-second-moment bookkeeping) on synthetic batches.

Reports images/s, peak memory (CPU: peak resident set of a fresh process per configuration;
CUDA: peak allocated), FLOPs per step (torch.utils.flop_counter, forward + backward) and the
achieved FLOP/s as a fraction of the device's peak: on CUDA the datasheet dense bf16/fp16
tensor peak of known GPUs (or --peak-tflops), on the CPU this machine's fp32 matmul peak
measured in the same process. The paper's optimised V100 runs reached 36-41% of peak.

    python benchmarks/bench_train.py        # CPU: tiny_diffusion at batch 8, 64x64 at batch 2
    python benchmarks/bench_train.py --device cuda --precision bf16 \
        --configs 64x64_diffusion:32 256x256_diffusion:8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from adm._util import dist
from adm.data import datasets as datalib
from adm.models.presets import get_preset
from adm.training.loop import DataSpec, RunSetup, TrainConfig, Trainer

# Dense tensor-core peak (TFLOP/s) for bf16/fp16 from the vendors' datasheets (SXM parts, and
# the H100's PCIe and NVL cards). The first key found in the device's name wins.
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.5, "H100 NVL": 835.5, "H100": 989.4,
               "A100": 312.0, "V100": 125.0, "L40S": 362.0}  # fmt: skip


def _peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value, f"datasheet {key} dense bf16/fp16"
        return None, f"unknown GPU {name}"
    a = torch.randn(1024, 1024)
    for _ in range(3):
        a @ a
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * 1024**3 / best / 1e12, "measured fp32 matmul peak of this CPU"


def _trainer(preset_name: str, batch: int, device: torch.device, precision: str, run_dir: str):
    preset = get_preset(preset_name)
    size = preset.image_size
    images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = np.arange(batch) % 2
    source = datalib.ArrayImages(images, labels, "synthetic")
    cfg = TrainConfig(
        steps=10**6, batch_size=batch, timestep_sampler="loss-second-moment",
        precision=precision, device=str(device), progress=False, save_interval=10**6,
    )  # fmt: skip
    setup = RunSetup(preset, cfg, DataSpec("synthetic"), run_dir, source, class_names=("a", "b"))
    info = dist.DistInfo(device=device)
    return Trainer(setup, info), setup


def measure(preset_name: str, batch: int, device: str, precision: str, steps: int,
            peak_override: float | None) -> dict:  # fmt: skip
    dev = dist.pick_device(device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as run_dir:
        tr, _ = _trainer(preset_name, batch, dev, precision, run_dir)
        size, c = tr.preset.image_size, tr.preset.network.in_channels
        x = torch.rand(batch, c, size, size) * 2 - 1
        y = torch.arange(batch) % 2
        tr.train_step(x, y)  # warm-up (allocator, autotuning)
        with FlopCounterMode(display=False) as counter:
            tr.train_step(x, y)
        flops = counter.get_total_flops()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            tr.train_step(x, y)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        if dev.type == "cuda":
            peak_mem = torch.cuda.max_memory_allocated(dev) / 2**20
        else:
            peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        peak, source = _peak_tflops(dev, peak_override)
    best = min(times)
    achieved = flops / best / 1e12
    return {
        "preset": preset_name,
        "batch": batch,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "precision": precision if dev.type == "cuda" else "fp32",
        "params_m": sum(p.numel() for p in tr.model.parameters()) / 1e6,
        "step_s_best": best,
        "step_s_median": float(np.median(times)),
        "images_per_s": batch / best,
        "gflop_per_step": flops / 1e9,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_source": source,
        "fraction_of_peak": achieved / peak if peak else None,
        "peak_memory_mb": peak_mem,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["tiny_diffusion:8", "64x64_diffusion:2"],
                   help="PRESET:BATCH items")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--steps", type=int, default=3, help="timed steps (best is reported)")
    p.add_argument("--peak-tflops", type=float, help="device peak for the fraction of peak")
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one config in this process
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args()
    if args.one:
        name, batch = args.one.rsplit(":", 1)
        result = measure(name, int(batch), args.device, args.precision, args.steps,
                         args.peak_tflops)  # fmt: skip
        print(json.dumps(result))
        return
    results = []
    for item in args.configs:  # a fresh process each: peak memory is per configuration
        cmd = [sys.executable, __file__, "--one", item, "--device", args.device,
               "--precision", args.precision, "--steps", str(args.steps)]  # fmt: skip
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if out.returncode:
            sys.exit(f"{item} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        frac = f"{100 * r['fraction_of_peak']:.1f}%" if r["fraction_of_peak"] else "n/a"
        print(
            f"{r['preset']:>18} b={r['batch']:<3} {r['device']} {r['precision']}: "
            f"{r['images_per_s']:.2f} img/s, step {r['step_s_best']:.3f} s, "
            f"{r['gflop_per_step']:.1f} GFLOP/step, {r['achieved_tflops'] * 1e3:.1f} GFLOP/s "
            f"({frac} of {r['peak_source']}), peak memory {r['peak_memory_mb']:.0f} MB",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
