"""Speed and memory of the ADM networks: forward and forward+backward time, images/s, peak memory,
FLOPs (torch.utils.flop_counter) and achieved GFLOP/s as a fraction of this machine's matmul peak
measured in the same run (best of square matmuls as `torch.mm` and as a 1x1 convolution, probed
again between repetitions).

The machine may be shared. Each repetition records its wall time, the process's CPU time and a
short matmul probe just before and after it. A repetition counts as disturbed when it took over
15% longer than the best, when (CPU) the process got under 85% of its threads' CPU time, or when
a neighbouring probe ran under 85% of the peak. Figures are those of the best repetition;
disturbed repetitions are counted, never averaged in. On the CPU a second estimate, immune to
time slices taken by other processes, divides the same FLOPs by CPU time per thread (exact with
`--threads 1`; with several threads it counts spin-waiting as work, so it is a lower bound).
Peak memory: the process's peak resident set on the CPU (weights and Python included), peak
allocated memory on CUDA.

    python benchmarks/bench_unet.py                                  # CPU: tiny, 64x64, 128x128
    python benchmarks/bench_unet.py --device cuda --precision bf16 --channels-last \
        --presets 64x64_diffusion,256x256_diffusion --batch 16
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
from dataclasses import asdict, dataclass

# isort: off
import adm  # noqa: F401 - first: it sets OMP_WAIT_POLICY (unless set) before torch loads OpenMP
import torch
from torch.utils.flop_counter import FlopCounterMode
# isort: on

from adm._util.runtime import autocast, prepare_model
from adm.models.presets import Preset, build_model, get_preset

SLOWER, CPU_SHARE, PROBE_OK = 1.15, 0.85, 0.85  # disturbance thresholds (see the docstring)


@dataclass
class Timing:
    """Repetitions of one measurement."""

    walls: list[float]  # seconds
    cpu_per_thread: list[float]  # process CPU seconds / threads
    probe_rates: list[float]  # GFLOP/s of the slower probe next to each repetition
    peak_mem_mb: float

    def disturbed(self, peak: float, cpu: bool) -> list[bool]:
        best = min(self.walls)
        return [
            wall > SLOWER * best or (cpu and c < CPU_SHARE * wall) or rate < PROBE_OK * peak
            for wall, c, rate in zip(self.walls, self.cpu_per_thread, self.probe_rates, strict=True)
        ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # Linux: writing "5" to clear_refs resets VmHWM (peak RSS) to the current RSS.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds per thread) of one call."""
    synchronize(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0, (time.process_time() - c0) / torch.get_num_threads()


class MatmulPeak:
    """Best GFLOP/s seen for square matmuls, by wall time and by CPU time per thread."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.wall: dict[str, float] = {"mm": 0.0, "conv1x1": 0.0}
        self.cpu: dict[str, float] = {"mm": 0.0, "conv1x1": 0.0}
        self.inner = 1 if device.type == "cpu" else 10
        n = 1536 if device.type == "cpu" else 8192
        self.probe_input = torch.randn(n, n, device=device, dtype=dtype)

    def _run(self, kind: str, a: torch.Tensor) -> float:
        n = a.shape[0]
        if kind == "mm":
            op: Callable[[], object] = lambda: a @ a  # noqa: E731
        else:  # the same product through the convolution kernels the networks use
            x, w = a.reshape(1, n, n // 32, 32), a.reshape(n, n, 1, 1)
            op = lambda: torch.nn.functional.conv2d(x, w)  # noqa: E731
        gflop = self.inner * 2 * n**3 / 1e9
        wall, cpu = timed(lambda: [op() for _ in range(self.inner)], self.device)
        self.wall[kind] = max(self.wall[kind], gflop / wall)
        self.cpu[kind] = max(self.cpu[kind], gflop / max(cpu, 1e-9))
        return gflop / wall

    def probe(self) -> float:
        return self._run("mm", self.probe_input)

    def measure(self, reps: int) -> None:
        for n in (1024, 2048, 3072) if self.device.type == "cpu" else (4096, 8192):
            a = torch.randn(n, n, device=self.device, dtype=self.dtype)
            for kind in ("mm", "conv1x1"):
                for _ in range(reps + 1):
                    self._run(kind, a)


def time_reps(
    fn: Callable[[], None], device: torch.device, reps: int, warmup: int, peak: MatmulPeak
) -> Timing:
    for _ in range(warmup):
        fn()
    walls, cpus, rates, mems = [], [], [], []
    for _ in range(reps):
        before = peak.probe()
        reset_peak_memory(device)
        wall, cpu = timed(fn, device)
        mems.append(peak_memory_mb(device))
        walls.append(wall)
        cpus.append(cpu)
        rates.append(min(before, peak.probe()))
    return Timing(walls, cpus, rates, max(mems))


def make_inputs(preset: Preset, batch: int, device: torch.device) -> tuple[tuple, dict]:
    size, net = preset.image_size, preset.network
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, net.in_channels, size, size, generator=g)
    t = torch.randint(0, preset.diffusion.steps, (batch,), generator=g)
    kwargs = {}
    if preset.kind == "superres":
        small = preset.small_size
        kwargs["low_res"] = torch.randn(batch, net.in_channels, small, small, generator=g)
    if getattr(net, "num_classes", None):
        kwargs["y"] = torch.randint(0, net.num_classes, (batch,), generator=g)
    return (x.to(device), t.to(device)), {k: v.to(device) for k, v in kwargs.items()}


def count_gflop(preset: Preset, batch: int) -> tuple[float, float]:
    """Forward and forward+backward GFLOP, counted on the meta device (nothing computed)."""
    model = build_model(preset, device="meta")
    args, kwargs = make_inputs(preset, batch, torch.device("meta"))
    with FlopCounterMode(display=False) as fwd:
        model(*args, **kwargs)
    with FlopCounterMode(display=False) as both:
        model(*args, **kwargs).float().square().mean().backward()
    return fwd.get_total_flops() / 1e9, both.get_total_flops() / 1e9


def bench(preset: Preset, args: argparse.Namespace, device: torch.device, peak: MatmulPeak) -> dict:
    fwd_gflop, both_gflop = count_gflop(preset, args.batch)
    torch.manual_seed(0)
    model = prepare_model(
        build_model(preset),
        device=device,
        channels_last=args.channels_last,
        compile=args.compile,
        trainable=True,  # the backward pass needs weight gradients
    ).eval()  # dropout off, as when sampling
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

    out = {"preset": preset.name, "params": preset.num_parameters, "batch": args.batch}
    out["fwd"] = (fwd_gflop, time_reps(forward, device, args.reps, args.warmup, peak))
    if not args.no_backward:
        timing = time_reps(forward_backward, device, args.reps_backward, 1, peak)
        out["fwd+bwd"] = (both_gflop, timing)
    return out


def report(results: list[dict], peak: MatmulPeak, args: argparse.Namespace, env: dict) -> str:
    cpu = peak.device.type == "cpu"
    best_wall, best_cpu = max(peak.wall.values()), max(peak.cpu.values())
    lines = [
        f"device: {env['device']}; torch {env['torch']}; threads {env['threads']}; "
        f"OMP_WAIT_POLICY {env['omp_wait_policy']}; precision {args.precision}; "
        f"channels_last {args.channels_last}; compile {args.compile}; "
        f"load average before/after {env['load_before']} / {env['load_after']}",
        f"{env['peak_dtype']} matmul peak (wall): {best_wall:.1f} GFLOP/s (torch.mm "
        f"{peak.wall['mm']:.1f}, 1x1 conv {peak.wall['conv1x1']:.1f})"
        + (f"; by CPU time per thread: {best_cpu:.1f} GFLOP/s" if cpu else ""),
        "",
        "| preset | pass | batch | params | GFLOP | best s | img/s | GFLOP/s | % of peak "
        + ("| CPU s/thread | % of peak (CPU time) " if cpu else "")
        + "| peak mem MB | disturbed reps |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" * cpu) + "---:|---|",
    ]
    for r in results:
        for name in ("fwd", "fwd+bwd"):
            if name not in r:
                continue
            gflop, t = r[name]
            wall, cpu_s = min(t.walls), min(t.cpu_per_thread)
            row = (
                f"| {r['preset']} | {name} | {r['batch']} | {r['params']:,} | {gflop:.1f} "
                f"| {wall:.3f} | {r['batch'] / wall:.3g} | {gflop / wall:.1f} "
                f"| {100 * gflop / wall / best_wall:.0f}% "
            )
            if cpu:
                row += f"| {cpu_s:.3f} | {100 * gflop / cpu_s / best_cpu:.0f}% "
            bad = sum(t.disturbed(best_wall, cpu))
            lines.append(row + f"| {t.peak_mem_mb:.0f} | {bad}/{len(t.walls)} |")
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
    peak_dtype = "fp32" if device.type == "cpu" else args.precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[peak_dtype]
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "peak_dtype": peak_dtype,
        "load_before": f"{os.getloadavg()[0]:.2f}",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "command": " ".join(["python", *sys.argv]),
    }
    peak = MatmulPeak(device, dtype)
    peak.measure(reps=5)
    results = []
    for name in args.presets.split(","):
        results.append(bench(get_preset(name.strip()), args, device, peak))
        print(f"done {name}", file=sys.stderr)
    peak.measure(reps=3)  # again at the end: the best of all measurements is the peak
    env["load_after"] = f"{os.getloadavg()[0]:.2f}"
    print(report(results, peak, args, env))
    if args.json:
        raw = {
            "env": env,
            "peak_wall": peak.wall,
            "peak_cpu": peak.cpu,
            "results": [
                {k: ([v[0], asdict(v[1])] if isinstance(v, tuple) else v) for k, v in r.items()}
                for r in results
            ],
        }
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
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
