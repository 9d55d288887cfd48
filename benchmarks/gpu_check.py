"""One GPU check for issue 17, in under 8 minutes on one H100/H200; its figures go into RESULTS.md.

Sections, each in its own try (a failure is recorded and the rest go on), under one time budget:
1. fp32 vs bf16 vs fp16 output agreement on the golden networks (tests/golden);
2. ADM-256 guided DDIM-25 (256x256_diffusion + 256x256_classifier, random weights) img/s at batch
   16: the original code in fp32 (when --original is given), adm fp32 eager, adm bf16 + SDPA;
3. forward MFU of ADM-256 in bf16: FLOPs by torch.utils.flop_counter, against the card's dense
   bf16 peak (benchmarks/bench_train.py's table);
4. training img/s of the 64x64 config (adm's real train step, bf16) against the paper's 74.1 img/s
   per V100;
5. benchmarks/bench_vs_original.py on the GPU, when the original code is present;
6. benchmarks/bench_primitives.py on the GPU: adm's primitives (the fused norm + SiLU's NCHW path
   included) against the plain PyTorch formulations, values and gradients checked, then timed;
7. section 2's loop for adm bf16 + SDPA + torch.compile (the UNet; the first loop, compiling,
   reported separately), last because compiling can take minutes.

`--only 2,7` runs just those sections (e.g. to rerun one that failed or ran out of time).

`--dry-run` runs every section on the CPU at tiny sizes (tiny presets, batch 2, DDIM-2) in a minute
or two and writes to a scratch file instead of RESULTS.md.

    benchmarks/gpu_check.sh --original /path/to/guided-diffusion
    benchmarks/gpu_check.sh --dry-run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

# isort: off
import adm  # noqa: F401 - first: it sets OMP_WAIT_POLICY (unless set) before torch loads OpenMP
import numpy as np
import torch
# isort: on

import bench_primitives
import bench_train
import bench_unet
import bench_vs_original
import original_code
import timing

from adm._util.runtime import prepare_model
from adm.diffusion import guidance, samplers
from adm.diffusion.gaussian import Diffusion
from adm.models import flags
from adm.models.presets import build_model, get_preset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
MARKER = "<!-- gpu_check.sh appends here -->"
PAPER_V100_IMG_S = 74.1  # 64x64 model, images/s per V100 (Dhariwal & Nichol 2021, Table 7)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SECTIONS = 7  # as numbered in the docstring, the report and --only


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the sections run: the real sizes on a GPU, tiny ones for the CPU dry run."""

    diffusion: str = "256x256_diffusion"
    classifier: str = "256x256_classifier"
    batch: int = 16
    steps: str = "ddim25"
    train: str = "64x64_diffusion"
    train_batch: int = 64
    repeats: int = 3
    compile_backend: str = "inductor"
    vs_original: tuple[str, ...] = ("fwd:64x64:16", "fwdbwd:33m:16", "guided:33m:16", "mem:33m:16")


# the dry run compiles with the "eager" backend: the same graph capture, no minutes of C++ builds
DRY = Sizes("tiny_diffusion", "tiny_classifier", 2, "ddim2", "tiny_diffusion", 2, 1, "eager",
            ("fwd:tiny:2", "fwdbwd:tiny:2", "guided:tiny:1", "mem:tiny:2"))  # fmt: skip


class Budget:
    """Seconds left of the global budget; sections ask before each costly part, and each runs
    under an alarm (SIGALRM) that interrupts it, compilation included, when its time is up."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, need: float, what: str) -> None:
        if self.left() < need:
            raise TimeoutError(f"{what} skipped: {self.left():.0f} s of the budget left")

    @contextlib.contextmanager
    def limit(self, seconds: float, keep: float = 0.0):
        """Run the block for at most `seconds`, and never into the last `keep` seconds."""
        outer, _ = signal.getitimer(signal.ITIMER_REAL)  # an enclosing limit, if any
        allowed = min(seconds, self.left() - keep, outer or float("inf"))
        if allowed < 0.1:
            raise TimeoutError(f"skipped: {self.left():.0f} s of the budget left")

        def stop(*_: object) -> None:
            raise TimeoutError(f"stopped after {allowed:.0f} s (time budget)")

        previous = signal.signal(signal.SIGALRM, stop)
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, allowed)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer:  # the enclosing limit goes on with what is left of it
                signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3))


# ---- 1. precision agreement on the golden networks -------------------------------------------


def golden_networks(folder: Path) -> list[tuple[str, torch.nn.Module, tuple, dict, np.ndarray]]:
    """(case, network with the golden weights, args, kwargs, the original's fp32 output)."""
    out = []
    for path in sorted(folder.glob("*.json")):
        meta = json.loads(path.read_text())
        if meta["kind"] not in ("unet_forward", "classifier", "superres"):
            continue
        arrays = np.load(path.with_suffix(".npz"))
        (name, spec), = meta["models"].items()  # fmt: skip
        config = flags.config_from_constructor(spec["class"], spec["kwargs"])
        net = flags.build_network(spec["class"], config)
        prefix = spec["state_dict_prefix"]
        state = {k[len(prefix) :]: arrays[k] for k in arrays.files if k.startswith(prefix)}
        net.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        t = arrays["input/t_classifier" if name == "classifier" else "input/t"]
        kwargs = {}
        if name == "classifier":
            expected = arrays["output/classifier_logits"]
        else:
            expected = arrays["output/model_output"]
            if config.num_classes and "input/y" in arrays.files:
                kwargs["y"] = torch.from_numpy(arrays["input/y"])
            if "input/low_res" in arrays.files:
                kwargs["low_res"] = torch.from_numpy(arrays["input/low_res"])
        args = (torch.from_numpy(arrays["input/x"]), torch.from_numpy(t))
        out.append((meta["case"], net.eval(), args, kwargs, expected))
    return out


def precision_agreement(device: torch.device, sizes: Sizes, budget: Budget) -> str:
    lines = [
        "| golden case | fp32 vs original | bf16 vs fp32 | fp16 vs fp32 |",
        "|---|---:|---:|---:|",
    ]
    for case, net, args, kwargs, expected in golden_networks(ROOT / "tests" / "golden"):
        budget.check(5, "the rest of the golden cases")
        net = net.to(device)
        args = tuple(a.to(device) for a in args)
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        scale = float(np.abs(expected).max())
        cells = []
        with torch.no_grad():
            fp32 = net(*args, **kwargs).float()
            cells.append(float(np.abs(fp32.cpu().numpy() - expected).max()) / scale)
            for dtype in DTYPES.values():
                try:
                    with torch.autocast(device.type, dtype=dtype):
                        low = net(*args, **kwargs).float()
                    cells.append(f"{(low - fp32).abs().max().item() / scale:.1e}")
                except RuntimeError as err:  # e.g. fp16 autocast where the device has none
                    cells.append(f"n/a ({str(err).splitlines()[0][:60]})")
        cells[0] = f"{cells[0]:.1e}"
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "max |difference| / max |original fp32 output|:\n\n" + "\n".join(lines)


# ---- 2. ADM-256 guided DDIM-25 throughput ------------------------------------------------------


def adm_sampler(device: torch.device, sizes: Sizes, precision: str | None, backend: str | None):
    """`run() -> samples` of adm's guided DDIM loop; the model under autocast when `precision`,
    compiled with torch.compile(backend=`backend`) when one is given."""
    preset, clf_preset = get_preset(sizes.diffusion), get_preset(sizes.classifier)
    torch.manual_seed(0)
    model = prepare_model(build_model(preset), device=device)
    if backend is not None:
        model = torch.compile(model, backend=backend)
    classifier = prepare_model(build_model(clf_preset), device=device)
    diff = Diffusion.from_config(
        dataclasses.replace(preset.diffusion, timestep_respacing=sizes.steps)
    )
    cond_fn = guidance.classifier_cond_fn(classifier, 1.0)
    g = torch.Generator().manual_seed(0)
    size = preset.image_size
    noise = torch.randn(sizes.batch, 3, size, size, generator=g).to(device)
    y = {"y": torch.randint(0, 1000, (sizes.batch,), generator=g).to(device)}

    def run() -> torch.Tensor:
        with _autocast(device, precision):
            return samplers.ddim_sample(model, diff, noise, cond_fn=cond_fn, model_kwargs=y)

    return run


def original_sampler(device: torch.device, sizes: Sizes, root: Path):
    """The original's guided DDIM loop in fp32 (its classifier_sample.py) on the same nets."""
    script_util = original_code.import_original(root)
    preset, clf_preset = get_preset(sizes.diffusion), get_preset(sizes.classifier)
    model = original_code.build_original(script_util, preset.network).to(device)
    classifier = original_code.build_original(script_util, clf_preset.network).to(device)
    spaced = original_code.original_diffusion(script_util, preset.diffusion, sizes.steps)
    run_loop = original_code.original_guided_ddim(spaced, model, classifier, 1.0)
    g = torch.Generator().manual_seed(0)
    size = preset.image_size
    noise = torch.randn(sizes.batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 1000, (sizes.batch,), generator=g).to(device)
    return lambda: run_loop(noise, y)


def sampling_variants(
    device: torch.device, sizes: Sizes, root: Path | None, compiled: bool
) -> list[tuple[str, Callable[[], Callable[[], object]]]]:
    if compiled:  # last: compilation can take minutes
        name = f"adm bf16 + SDPA + torch.compile (UNet, {sizes.compile_backend})"
        return [(name, lambda: adm_sampler(device, sizes, "bf16", sizes.compile_backend))]
    variants: list[tuple[str, Callable[[], Callable[[], object]]]] = []
    if root is not None:
        variants.append(
            ("original code, fp32 eager", lambda: original_sampler(device, sizes, root))
        )
    variants.append(("adm fp32 eager", lambda: adm_sampler(device, sizes, None, None)))
    variants.append(("adm bf16 + SDPA", lambda: adm_sampler(device, sizes, "bf16", None)))
    return variants


def sampling_throughput(
    device: torch.device, sizes: Sizes, budget: Budget, root: Path | None, compiled: bool = False
) -> str:
    lines = [
        f"{sizes.diffusion} + {sizes.classifier}, guided {sizes.steps}, batch {sizes.batch}, "
        "random weights; img/s = batch / best loop time; TF32 as PyTorch's defaults (cuDNN "
        f"{torch.backends.cudnn.allow_tf32}, matmul {torch.backends.cuda.matmul.allow_tf32})",
        "",
        "| variant | img/s | best loop s | loops (s; * disturbed) | first loop s (compile) |",
        "|---|---:|---:|---|---:|",
    ]
    for name, make in sampling_variants(device, sizes, root, compiled):
        try:
            with budget.limit(300 if compiled else 120, keep=0 if compiled else 150):
                run = make()
                start = time.perf_counter()
                run()  # warm-up: autotuning, compilation
                _sync(device)
                first = time.perf_counter() - start
                repeats = sizes.repeats if first * (sizes.repeats + 1) < 60 else 1  # slow: fp32
                t = timing.Timings([timing.time_call(run) for _ in range(repeats)])
            rate = sizes.batch / t.best
            lines.append(f"| {name} | {rate:.2f} | {t.best:.2f} | {t.describe()} | {first:.1f} |")
        except Exception as err:  # recorded; the other variants go on
            lines.append(f"| {name} | failed: {_one_line(err)} | | | |")
        _free(device)
    return "\n".join(lines)


# ---- 3. forward MFU -------------------------------------------------------------------------


def forward_mfu(device: torch.device, sizes: Sizes, budget: Budget) -> str:
    preset = get_preset(sizes.diffusion)
    gflop, _ = bench_unet.count_gflop(preset, sizes.batch)
    peak, source = bench_train._peak_tflops(device, None)
    lines = [f"{sizes.diffusion} forward, batch {sizes.batch}: {gflop:.0f} GFLOP (flop_counter)"]
    lines += ["", "| precision | best s | TFLOP/s | MFU |", "|---|---:|---:|---:|"]
    torch.manual_seed(0)
    model = prepare_model(build_model(preset), device=device)
    (x, t), kwargs = bench_unet.make_inputs(preset, sizes.batch, device)
    for precision in ("bf16", "fp32"):
        budget.check(20, f"{precision} forward")

        def forward(precision: str = precision) -> None:
            with torch.no_grad(), _autocast(device, precision):
                model(x, t, **kwargs)

        best = timing.repeat(forward, sizes.repeats + 2).best
        tflops = gflop / best / 1e3
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        lines.append(f"| {precision} | {best:.3f} | {tflops:.3g} | {mfu} |")
    return "\n".join(lines) + f"\n\npeak: {peak or 0:.3g} TFLOP/s ({source})"


# ---- 4. training throughput -----------------------------------------------------------------


def training(device: torch.device, sizes: Sizes, budget: Budget) -> str:
    budget.check(40, "training")
    precision = "bf16" if device.type == "cuda" else "fp32"
    r = bench_train.measure(
        sizes.train, sizes.train_batch, str(device), precision, sizes.repeats, None
    )
    frac = f"{100 * r['fraction_of_peak']:.1f}%" if r["fraction_of_peak"] else "n/a"
    return (
        f"{sizes.train} training (adm's train step: hybrid loss, AdamW, EMA), batch {r['batch']}, "
        f"{r['precision']}: **{r['images_per_s']:.1f} img/s** (paper: {PAPER_V100_IMG_S} img/s per "
        f"V100, ratio {r['images_per_s'] / PAPER_V100_IMG_S:.2f}); step {r['step_s_best']:.3f} s, "
        f"{r['achieved_tflops']:.3g} TFLOP/s ({frac} of {r['peak_source']}), peak memory "
        f"{r['peak_memory_mb']:.0f} MB"
    )


# ---- 5. against the original ------------------------------------------------------------------


def vs_original(device: torch.device, sizes: Sizes, budget: Budget, root: Path | None) -> str:
    if root is None:
        return "not run: no original code (--original PATH or $ADM_ORIGINAL)"
    budget.check(60, "the comparison with the original")
    argv = ["--original", str(root), "--device", device.type, "--measure", *sizes.vs_original]
    argv += ["--repeats", str(sizes.repeats), "--repeats-guided", "2", "--steps", sizes.steps]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = bench_vs_original.main(argv)
    return f"`bench_vs_original.py {' '.join(argv)}` (exit {code}):\n\n" + out.getvalue().strip()


def primitives(device: torch.device, sizes: Sizes, budget: Budget) -> str:
    budget.check(10, "the primitives")
    text, _ = bench_primitives.run(sizes is DRY, sizes.repeats + 2, device.type)
    return f"`bench_primitives.py --device {device.type}` (fp32, NCHW):\n\n```{text}\n```"


# ---- driver ---------------------------------------------------------------------------------


def _autocast(device: torch.device, precision: str | None):
    """bf16/fp16 autocast on any device (the CPU too, for the dry run); fp32/None: nothing."""
    if precision in DTYPES:
        return torch.autocast(device.type, dtype=DTYPES[precision])
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"


def header(device: torch.device, args: argparse.Namespace) -> str:
    m = timing.machine()
    card = m.get("gpu", "no GPU (CPU dry run)")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"#### GPU check, {when}: {card}\n\n"
        f"Command: `{' '.join(['benchmarks/gpu_check.sh', *args.argv])}`; torch {m['torch']}, "
        f"CUDA {m.get('cuda', 'none')}, device {device}; CPU {m['cpu']}, capability "
        f"{m['cpu_capability']}, {m['threads']} threads; load average {m['load_average']}."
    )


def write(path: Path, text: str) -> None:
    """Insert `text` before the marker in RESULTS.md (append when there is none)."""
    old = path.read_text() if path.exists() else ""
    if MARKER in old:
        new = old.replace(MARKER, text.rstrip() + "\n\n" + MARKER, 1)
    else:
        new = old.rstrip("\n") + "\n\n" + text if old else text
    path.write_text(new)


def _parse_only(value: str | None, parser: argparse.ArgumentParser) -> set[int] | None:
    """`--only 2,7` -> {2, 7}; None: every section. A bad value stops before any work."""
    if value is None:
        return None
    try:
        numbers = {int(part) for part in value.split(",")}
    except ValueError:
        numbers = set()
    if not numbers or not numbers <= set(range(1, SECTIONS + 1)):
        expected = f"section numbers 1-{SECTIONS} joined by commas"
        parser.error(f"--only: expected {expected}, got {value!r}")
    return numbers


def main(argv: list[str] | None = None) -> int:
    # bench_vs_original's parser: a bad argument is one line and exit 2, not the usage block
    p = bench_vs_original._Parser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, a scratch output file")
    p.add_argument("--original", default=None, help="the original code (or $ADM_ORIGINAL)")
    p.add_argument("--out", default=None, help="where to write (RESULTS.md; dry run: a temp file)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for all sections")
    p.add_argument(
        "--only", default=None, metavar="N,N",
        help="run only these sections, by number (1-7, as numbered in the report and in this "
        "script's docstring), e.g. to rerun one that failed or ran out of time",
    )  # fmt: skip
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    only = _parse_only(args.only, p)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device visible; use --dry-run to check the script on the CPU",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = DRY if args.dry_run else Sizes()
    out = Path(args.out) if args.out else (Path(tempfile.gettempdir()) / "gpu_check_dry_run.md"
                                           if args.dry_run else RESULTS)  # fmt: skip
    try:
        root: Path | None = original_code.find_original(args.original)
    except original_code.OriginalMissing as err:
        root, note = None, str(err)
    else:
        note = f"original code: {root}"
    budget = Budget(args.budget)
    sections: list[tuple[str, float, Callable[[], str]]] = [
        ("fp32 / bf16 / fp16 agreement on the golden networks", 40,
         lambda: precision_agreement(device, sizes, budget)),
        ("guided DDIM sampling throughput", 300,
         lambda: sampling_throughput(device, sizes, budget, root)),
        ("forward MFU", 60, lambda: forward_mfu(device, sizes, budget)),
        ("training throughput", 60, lambda: training(device, sizes, budget)),
        ("against the original (bench_vs_original.py)", 120,
         lambda: vs_original(device, sizes, budget, root)),
        ("primitives against plain PyTorch (bench_primitives.py)", 30,
         lambda: primitives(device, sizes, budget)),
        ("guided DDIM sampling throughput, compiled", 300,
         lambda: sampling_throughput(device, sizes, budget, root, compiled=True)),
    ]  # fmt: skip
    assert len(sections) == SECTIONS
    numbered = [(n, *s) for n, s in enumerate(sections, 1) if only is None or n in only]
    if args.dry_run and not args.out:
        out.unlink(missing_ok=True)  # the scratch file holds one dry run
    write(out, header(device, args) + "\n\n" + note + "\n")
    failures = 0
    for number, title, cap, section in numbered:
        start = time.perf_counter()
        try:
            with budget.limit(cap):
                body = section()
        except (Exception, SystemExit) as err:  # recorded; the next section goes on
            failures += 1
            body = f"FAILED: {_one_line(err)}"
            traceback.print_exc()
        text = f"**{number}. {title}** ({time.perf_counter() - start:.0f} s)\n\n{body}\n"
        print(text, flush=True)
        write(out, text)  # at once: a run stopped later keeps what it measured
        _free(device)
    print(f"written to {out} ({failures} section(s) failed)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
