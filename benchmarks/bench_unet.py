"""Speed and memory of the ADM networks: forward and forward+backward time, images/s, peak memory,
FLOPs (torch.utils.flop_counter) and achieved GFLOP/s as a fraction of this machine's measured
matmul peak (measured in the same run).

The machine may be shared: every repetition records its wall time and the process's CPU time.
A repetition is flagged as disturbed when it took over 15% longer than the best one, or (on the
CPU) when the process got less than 85% of its threads' worth of CPU time. Figures are those of
the best repetition; disturbed ones are counted, never averaged in. Peak memory is the process's
peak resident set during the repetitions on the CPU (weights and Python included), the peak
allocated memory on CUDA.

    python benchmarks/bench_unet.py                                  # CPU: tiny, 64x64, 128x128
    python benchmarks/bench_unet.py --device cuda --precision bf16 --presets 256x256_diffusion \
        --batch 16 --channels-last
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from adm.presets import Preset, build_model, get_preset
from adm.runtime import autocast, prepare_model

SLOWER = 1.15  # a repetition this much slower than the best counts as disturbed
CPU_SHARE = 0.85  # ... or one that got less than this share of its threads' CPU time


@dataclass
class Timing:
    """Repetitions of one measurement; `best` is the undisturbed estimate."""

    walls: list[float]
    disturbed: list[bool]
    peak_mem_mb: float

    @property
    def best(self) -> float:
        return min(self.walls)


@dataclass
class Result:
    preset: str
    batch: int
    image_size: int
    params: int
    fwd_gflop: float
    fwd_bwd_gflop: float
    fwd: Timing | None = None
    fwd_bwd: Timing | None = None
    extra: dict = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Start a peak-memory window (CUDA: allocated memory; CPU: the process's resident set)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing "5" to clear_refs resets VmHWM (peak RSS) to the current RSS.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def read_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return _proc_status("VmHWM")


def _proc_status(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def time_reps(fn: Callable[[], None], device: torch.device, reps: int, warmup: int) -> Timing:
    threads = torch.get_num_threads()
    for _ in range(warmup):
        fn()
    synchronize(device)
    walls, cpu_shares, peaks = [], [], []
    for _ in range(reps):
        reset_peak(device)
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        synchronize(device)
        wall = time.perf_counter() - t0
        walls.append(wall)
        cpu_shares.append((time.process_time() - c0) / (wall * threads))
        peaks.append(read_peak(device))
    best = min(walls)
    disturbed = [
        w > SLOWER * best or (device.type == "cpu" and s < CPU_SHARE)
        for w, s in zip(walls, cpu_shares, strict=True)
    ]
    return Timing(walls=walls, disturbed=disturbed, peak_mem_mb=max(peaks))


def matmul_peak(device: torch.device, dtype: torch.dtype, reps: int) -> float:
    """Best GFLOP/s of square matmuls (several sizes, best repetition): the machine's peak."""
    sizes = (1024, 2048, 3072) if device.type == "cpu" else (4096, 8192)
    best, inner = 0.0, (1 if device.type == "cpu" else 20)
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        timing = time_reps(lambda a=a, b=b: [a @ b for _ in range(inner)], device, reps, 1)
        best = max(best, inner * 2 * n**3 / timing.best / 1e9)
    return best


def make_inputs(preset: Preset, batch: int, device: torch.device) -> tuple[tuple, dict]:
    size, net = preset.image_size, preset.network
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, net.in_channels, size, size, generator=g).to(device)
    t = torch.randint(0, preset.diffusion.steps, (batch,), generator=g).to(device)
    kwargs = {}
    if preset.kind == "superres":
        small = preset.small_size
        kwargs["low_res"] = torch.randn(batch, 3, small, small, generator=g).to(device)
    if getattr(net, "num_classes", None):
        kwargs["y"] = torch.randint(0, net.num_classes, (batch,), generator=g).to(device)
    return (x, t), kwargs


def count_flops(preset: Preset, batch: int) -> tuple[float, float]:
    """Forward and forward+backward FLOPs, counted on the meta device (nothing is computed)."""
    model = build_model(preset, device="meta")
    args, kwargs = make_inputs_meta(preset, batch)
    with FlopCounterMode(display=False) as fwd:
        model(*args, **kwargs)
    with FlopCounterMode(display=False) as both:
        model(*args, **kwargs).float().square().mean().backward()
    return fwd.get_total_flops() / 1e9, both.get_total_flops() / 1e9


def make_inputs_meta(preset: Preset, batch: int) -> tuple[tuple, dict]:
    args, kwargs = make_inputs(preset, batch, torch.device("cpu"))
    to_meta = lambda v: v.to("meta")  # noqa: E731
    return tuple(map(to_meta, args)), {k: to_meta(v) for k, v in kwargs.items()}


def bench(preset: Preset, args: argparse.Namespace, device: torch.device) -> Result:
    params = preset.num_parameters
    fwd_gflop, both_gflop = count_flops(preset, args.batch)
    result = Result(preset.name, args.batch, preset.image_size, params, fwd_gflop, both_gflop)
    torch.manual_seed(0)
    model = build_model(preset)
    model = prepare_model(
        model,
        device=device,
        channels_last=args.channels_last,
        compile=args.compile,
        trainable=True,
    ).eval()
    (x, t), kwargs = make_inputs(preset, args.batch, device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    amp = autocast(device, args.precision)

    def forward() -> None:
        with torch.no_grad(), amp:
            model(x, t, **kwargs)

    def forward_backward() -> None:
        with amp:
            loss = model(x, t, **kwargs).float().square().mean()
        loss.backward()
        for p in model.parameters():
            p.grad = None

    result.fwd = time_reps(forward, device, args.reps, args.warmup)
    if not args.no_backward:
        result.fwd_bwd = time_reps(forward_backward, device, args.reps_backward, 1)
    return result


def report(results: list[Result], peak: float, args: argparse.Namespace, env: dict) -> str:
    lines = [
        f"device: {env['device']}; torch {env['torch']}; threads {env['threads']}; "
        f"precision {args.precision}; channels_last {args.channels_last}; compile {args.compile}",
        f"measured {env['peak_dtype']} matmul peak: {peak:.1f} GFLOP/s; load average before/after: "
        f"{env['load_before']} / {env['load_after']}",
        "",
        "| preset | batch | params | GFLOP fwd | fwd s (best) | fwd img/s | fwd GFLOP/s "
        "| % peak | fwd peak mem MB | fwd+bwd s (best) | fwd+bwd img/s | fwd+bwd % peak "
        "| fwd+bwd peak mem MB | disturbed reps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        f, b = r.fwd, r.fwd_bwd
        assert f is not None
        rate = r.fwd_gflop / f.best
        row = (
            f"| {r.preset} | {r.batch} | {r.params:,} | {r.fwd_gflop:.1f} | {f.best:.3f} "
            f"| {r.batch / f.best:.2f} | {rate:.1f} | {100 * rate / peak:.0f}% "
            f"| {f.peak_mem_mb:.0f} "
        )
        if b is not None:
            rate_b = r.fwd_bwd_gflop / b.best
            row += (
                f"| {b.best:.3f} | {r.batch / b.best:.2f} | {100 * rate_b / peak:.0f}% "
                f"| {b.peak_mem_mb:.0f} "
            )
        else:
            row += "| - | - | - | - "
        disturbed = f"fwd {sum(f.disturbed)}/{len(f.walls)}"
        if b is not None:
            disturbed += f", fwd+bwd {sum(b.disturbed)}/{len(b.walls)}"
        lines.append(row + f"| {disturbed} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="tiny_diffusion,64x64_diffusion,128x128_diffusion")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--reps", type=int, default=5, help="timed forward repetitions")
    p.add_argument("--reps-backward", type=int, default=3, help="timed forward+backward reps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the raw figures here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak_dtype = "fp32" if device.type == "cpu" or args.precision == "fp32" else args.precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[peak_dtype]
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_dtype": peak_dtype,
        "load_before": f"{os.getloadavg()[0]:.2f}",
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    peak = matmul_peak(device, dtype, reps=7)
    results = []
    for name in args.presets.split(","):
        results.append(bench(get_preset(name.strip()), args, device))
        print(f"done {name}", file=sys.stderr)
    peak = max(peak, matmul_peak(device, dtype, reps=3))  # measured again at the end
    env["load_after"] = f"{os.getloadavg()[0]:.2f}"
    print(report(results, peak, args, env))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "peak_gflops": peak, "results": [asdict(r) for r in results]}, f)
    return 0


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        model = platform.processor() or "CPU"
    return f"{model} ({os.cpu_count()} logical CPUs)"


if __name__ == "__main__":
    sys.exit(main())
