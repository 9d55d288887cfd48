"""adm against the paper's released code (openai/guided-diffusion): same networks, same weights.

Both networks are built from one configuration (adm's preset, i.e. the README's flag line, given to
the original's constructor), the weights are copied strictly (state-dict keys must match), and the
outputs must agree (max |adm - original| <= 1e-4 x max |original|) before anything is timed. Then
each measurement runs as interleaved pairs in one process (warm-up, then adm, original, adm,
original, ...), and the report gives the median ratio original time / adm time (> 1: adm faster)
over the undisturbed pairs, its min-max and interquartile range, the number of disturbed pairs (a
side more than 1.25x its own best, benchmarks/timing.py), the median over all pairs, the median
ratio of process CPU times (not inflated by other processes' load; with `--threads 1` an estimate
of the undisturbed ratio), the load average and the CPU capability.

Measurements are KIND:NETWORK:BATCH. Kinds: `fwd` (no_grad forward), `fwdbwd` (train mode,
forward, mean square loss, backward into the weights), `guided` (classifier-guided DDIM loop,
`--steps`; adm's `samplers.ddim_sample` + `guidance.classifier_cond_fn` against the original's
`ddim_sample_loop` with `cond_fn` as in its scripts/classifier_sample.py; the network's released
classifier guides), `mem` (peak memory of one forward+backward: CPU peak RSS in a fresh
subprocess per implementation, CUDA max_memory_allocated). Networks: see `--help`.

adm's networks are prepared as its commands prepare them: `fwd` and `guided` as `adm sample` does
(channels_last on the CPU), `fwdbwd` as `adm train` does (NCHW on the CPU). The ratio varies more
from process to process than between pairs in one process (measured: 1.18-1.32 across eight
processes for the 33m training step): `--processes N` runs the timed measurements in N fresh
processes, one after another, and reports the median of their median ratios with its min-max.

    python benchmarks/bench_vs_original.py --original /path/to/guided-diffusion
    python benchmarks/bench_vs_original.py --quick            # tiny networks, seconds
    python benchmarks/bench_vs_original.py --measure fwd:64x64:1 guided:33m:1 --json out.json
    python benchmarks/bench_vs_original.py --measure fwdbwd:33m:4 --processes 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

# isort: off
import adm  # noqa: F401 - first: it sets OMP_WAIT_POLICY (unless set) before torch loads OpenMP
import torch
# isort: on

import original_code
import timing
from bench_unet import peak_memory_mb, reset_peak_memory
from original_code import NetworkConfig

from adm._util.runtime import prepare_model
from adm.diffusion import guidance, samplers
from adm.diffusion.gaussian import Diffusion, DiffusionConfig
from adm.diffusion.schedule import space_timesteps
from adm.models.presets import build_model, get_preset
from adm.nets import unet as adm_unet

TOLERANCE = 1e-4  # max |adm - original| relative to max |original|
GRAD_TOLERANCE = 1e-3  # the same for every gradient of one forward + backward (see check_gradients)
KINDS = ("fwd", "fwdbwd", "guided", "mem")
DEFAULT = ("fwd:33m:4", "fwd:64x64:1", "fwd:128x128_classifier:4", "fwdbwd:33m:4", "guided:33m:1")
DEFAULT += ("fwdbwd:33m_dropout:4", "mem:33m:4")
QUICK = ("fwd:tiny:2", "fwd:tiny_classifier:2", "fwdbwd:tiny:2", "guided:tiny:1", "mem:tiny:2")


@dataclass(frozen=True)
class Network:
    config: NetworkConfig
    diffusion: DiffusionConfig
    classifier: str | None  # the network that guides it (`guided` measurements)


def _preset(name: str, **changes) -> Network:
    p = get_preset(name)
    network = dataclasses.replace(p.network, **changes) if changes else p.network
    return Network(network, p.diffusion, p.sampling.classifier)


NETWORKS: dict[str, Callable[[], Network]] = {
    # The 64x64 config at 64 base channels, as issue 17 measured it (the released flags without
    # --dropout, i.e. 0), and with the released model's training dropout (0.1).
    "33m": lambda: _preset("64x64_diffusion", model_channels=64, dropout=0.0),
    "33m_dropout": lambda: _preset("64x64_diffusion", model_channels=64),
    "64x64": lambda: _preset("64x64_diffusion"),
    "64x64_classifier": lambda: _preset("64x64_classifier"),
    "128x128_classifier": lambda: _preset("128x128_classifier"),
    "tiny": lambda: _preset("tiny_diffusion"),
    "tiny_classifier": lambda: _preset("tiny_classifier"),
}


@dataclass(frozen=True)
class Measure:
    kind: str
    network: str
    batch: int

    @classmethod
    def parse(cls, text: str) -> Measure:
        parts = text.split(":")
        if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
            raise ValueError(f"--measure {text!r}: expected KIND:NETWORK:BATCH, e.g. fwd:33m:4")
        kind, net, batch = parts[0], parts[1], int(parts[2])
        if kind not in KINDS:
            raise ValueError(f"--measure {text!r}: kind must be one of {', '.join(KINDS)}")
        if net not in NETWORKS:
            raise ValueError(f"--measure {text!r}: network must be one of {', '.join(NETWORKS)}")
        if kind == "guided" and NETWORKS[net]().classifier is None:
            raise ValueError(f"--measure {text!r}: {net} has no classifier to guide it")
        return cls(kind, net, batch)

    def __str__(self) -> str:
        return f"{self.kind}:{self.network}:{self.batch}"


@dataclass(frozen=True)
class AdmOptions:
    """How adm's networks are prepared: `prepare_model`'s default memory format unless
    `channels_last` is set; attention recomputed in backward (as the original always does) when
    `checkpoint_attention` and adm has `adm.nets.unet.set_attention_checkpointing`."""

    channels_last: bool | None = None
    checkpoint_attention: bool = False

    def prepare(self, net: torch.nn.Module, device: torch.device, trainable: bool = False):
        net = prepare_model(
            net, device=device, channels_last=self.channels_last, trainable=trainable
        )
        if self.checkpoint_attention:
            adm_unet.set_attention_checkpointing(net, True)  # checked by parse_args
        return net

    def argv(self) -> list[str]:
        """The same options for a subprocess."""
        on = {
            "--channels-last": self.channels_last,
            "--checkpoint-attention": self.checkpoint_attention,
        }
        return [flag for flag, value in on.items() if value]


class Pairs:
    """Both implementations of every network used, built once, weights copied, outputs checked."""

    def __init__(self, script_util, device: torch.device, options: AdmOptions) -> None:
        self.script_util, self.device, self.options = script_util, device, options
        self.built: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}
        self.agreement: dict[str, float] = {}
        self.grad_agreement: dict[str, tuple[float, str]] = {}

    def get(self, name: str, trainable: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(adm network, original network) on the device, adm prepared as adm's commands prepare
        it: for inference (`adm sample`), or for training (`adm train`) when `trainable`. On the
        CPU the two differ in memory format (`prepare_model`: channels_last for inference, NCHW
        for training), so a training step is timed in the layout `adm train` uses."""
        key = f"{name}:train" if trainable else name
        if key not in self.built:
            config = NETWORKS[name]().config
            pair = build_pair(self.script_util, config, self.device, self.options, trainable)
            self.built[key] = pair
            rel = check_agreement(*pair, config)
            self.agreement[name] = max(self.agreement.get(name, 0.0), rel)
        return self.built[key]


def build_pair(
    script_util,
    config: NetworkConfig,
    device: torch.device,
    options: AdmOptions,
    trainable: bool = False,
):
    torch.manual_seed(0)
    original = original_code.build_original(script_util, config)
    ours = build_model(config)
    problems = original_code.copy_weights(original, ours)
    if problems:
        raise SystemExit(f"state dicts differ ({len(problems)} keys): " + "; ".join(problems[:5]))
    return options.prepare(ours, device, trainable).eval(), original.to(device)  # _step: train


def inputs(config: NetworkConfig, batch: int, device: torch.device, seed: int = 0):
    """(x, t, kwargs) for a forward pass: noise, random timesteps, random labels if any."""
    g = torch.Generator().manual_seed(seed)
    size = config.image_size
    x = torch.randn(batch, config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    kwargs = {}
    if getattr(config, "num_classes", None):
        kwargs["y"] = torch.randint(0, config.num_classes, (batch,), generator=g).to(device)
    return x.to(device), t.to(device), kwargs


def check_agreement(ours, original, config: NetworkConfig) -> float:
    """Max |adm - original| / max |original| of one forward (TF32 off); exits above TOLERANCE."""
    x, t, kwargs = inputs(config, 2, next(ours.parameters()).device, seed=1)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            a, b = ours(x, t, **kwargs).float(), original(x, t, **kwargs).float()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    rel = ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
    if not rel <= TOLERANCE:
        raise SystemExit(f"outputs differ: max |adm - original| is {rel:.2e} of max |original|")
    return rel


def check_gradients(ours, original, config: NetworkConfig) -> tuple[float, str]:
    """One forward + backward of both networks (eval mode, so no dropout; TF32 off), mean-square
    loss: the worst disagreement over the input's and every weight's gradient, as
    (max |adm - original| / max(max |original|, 1e-3 x the largest gradient), tensor name).
    The floor keeps gradients that are zero in exact arithmetic (a bias feeding a GroupNorm) from
    reading as disagreement. Exits above GRAD_TOLERANCE."""
    device = next(ours.parameters()).device
    x, t, kwargs = inputs(config, 2, device, seed=3)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    grads = []
    try:
        for net in (ours, original):
            trainable = [p.requires_grad for p in net.parameters()]
            net.eval().requires_grad_(True)
            xi = x.clone().requires_grad_(True)
            net(xi, t, **kwargs).float().square().mean().backward()
            named = {"input": xi.grad}
            named.update({n: p.grad for n, p in net.named_parameters()})
            grads.append({n: g.detach().float() for n, g in named.items() if g is not None})
            for p, flag in zip(net.parameters(), trainable, strict=True):
                p.grad = None
                p.requires_grad_(flag)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = grads
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:5]
        raise SystemExit(f"gradients differ in which tensors get one: {only}")
    floor = 1e-3 * max(g.abs().max().item() for g in b.values())
    worst = max(
        (((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=floor)).item(), n) for n in b
    )
    if not worst[0] <= GRAD_TOLERANCE:
        raise SystemExit(f"gradients differ: {worst[1]} by {worst[0]:.2e} of its scale")
    return worst


def forward_calls(pairs: Pairs, m: Measure) -> dict[str, Callable[[], object]]:
    ours, original = pairs.get(m.network)
    x, t, kwargs = inputs(NETWORKS[m.network]().config, m.batch, pairs.device)

    def call(net) -> Callable[[], object]:
        def run() -> None:
            with torch.no_grad():
                net(x, t, **kwargs)

        return run

    return {"adm": call(ours), "original": call(original)}


def backward_calls(pairs: Pairs, m: Measure) -> dict[str, Callable[[], object]]:
    ours, original = pairs.get(m.network, trainable=True)
    config = NETWORKS[m.network]().config
    if m.network not in pairs.grad_agreement:  # the hand-written backward passes checked
        pairs.grad_agreement[m.network] = check_gradients(ours, original, config)
    x, t, kwargs = inputs(config, m.batch, pairs.device)
    return {"adm": _step(ours, x, t, kwargs), "original": _step(original, x, t, kwargs)}


def _step(net, x, t, kwargs) -> Callable[[], None]:
    """One training forward + backward: train mode (dropout as configured: 0 for 33m, 0.1 for
    33m_dropout and the released 64x64 config, on both sides), then back to eval mode for the
    other measurements."""

    def run() -> None:
        net.train()
        net(x, t, **kwargs).float().square().mean().backward()
        for p in net.parameters():
            p.grad = None
        net.eval()

    return run


def guided_calls(pairs: Pairs, m: Measure, steps: str, scale: float) -> dict:
    """Both guided DDIM loops from the same noise and labels; also returns their samples' max
    difference (the loops differ only in float rounding)."""
    net = NETWORKS[m.network]()
    assert net.classifier is not None
    ours, original = pairs.get(m.network)
    ours.requires_grad_(False)
    ours_c, original_c = pairs.get(net.classifier)
    ours_c.requires_grad_(False)
    noise, _, kwargs = inputs(net.config, m.batch, pairs.device, seed=2)
    diff = Diffusion.from_config(dataclasses.replace(net.diffusion, timestep_respacing=steps))
    cond_fn = guidance.classifier_cond_fn(ours_c, scale)
    spaced = original_code.original_diffusion(pairs.script_util, net.diffusion, steps)
    theirs = original_code.original_guided_ddim(spaced, original, original_c, scale)

    def run_ours() -> torch.Tensor:
        return samplers.ddim_sample(
            ours, diff, noise, cond_fn=cond_fn, clip_denoised=True, model_kwargs=kwargs
        )

    def run_original() -> torch.Tensor:
        return theirs(noise, kwargs["y"])

    diff_max = (run_ours() - run_original()).abs().max().item()
    return {"adm": run_ours, "original": run_original, "sample_max_abs_diff": diff_max}


# ---- memory ---------------------------------------------------------------------------------


def memory_of_step(
    impl: str, m: Measure, script_util, device: torch.device, options: AdmOptions
) -> dict[str, float]:
    """Peak memory (MB) of the first forward+backward of a fresh network: CPU peak RSS (and the
    RSS just before the step), CUDA max_memory_allocated (and memory allocated before)."""
    config = NETWORKS[m.network]().config
    torch.manual_seed(0)
    if impl == "adm":
        net = options.prepare(build_model(config), device, trainable=True)
    else:
        net = original_code.build_original(script_util, config).to(device).train()
    x, t, kwargs = inputs(config, m.batch, device)
    step = _step(net, x, t, kwargs)
    reset_peak_memory(device)
    before = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    before = peak_memory_mb(device) if before is None else before  # RSS right after the reset
    step()
    peak = peak_memory_mb(device)
    return {"before_mb": before, "peak_mb": peak, "step_mb": peak - before}


def memory_pair(m: Measure, args: argparse.Namespace, pairs: Pairs) -> dict[str, dict]:
    """Both implementations' `memory_of_step`; on the CPU each in a fresh subprocess (same
    imports, same start), alternating, `--memory-repeats` times, the smallest peak kept."""
    out: dict[str, list[dict]] = {"adm": [], "original": []}
    for _ in range(args.memory_repeats):
        for impl in out:
            if pairs.device.type == "cuda":
                step = memory_of_step(impl, m, pairs.script_util, pairs.device, pairs.options)
                out[impl].append(step)
                continue
            command = [sys.executable, __file__, "--memory-child", impl, "--measure", str(m)]
            command += ["--original", args.original_root, "--threads", str(torch.get_num_threads())]
            command += pairs.options.argv()
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"memory subprocess ({impl}) failed: {done.stderr.strip()[-300:]}")
            out[impl].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {impl: min(runs, key=lambda r: r["peak_mb"]) for impl, runs in out.items()}


# ---- timing and report ----------------------------------------------------------------------


def summarise(t: dict[str, timing.Timings]) -> dict:
    """`timing.paired` of adm against the original (ratio original/adm over the undisturbed
    pairs, its spread, the medians of the times), with every pair's times."""
    s = timing.paired(t["adm"], t["original"])
    s["adm_s"], s["original_s"] = s.pop("ours_s"), s.pop("theirs_s")
    return s | {"adm_times": t["adm"].times, "original_times": t["original"].times}


def run_measure(m: Measure, args: argparse.Namespace, pairs: Pairs) -> dict:
    ours, _ = pairs.get(m.network)  # built and checked before anything is timed
    out: dict = {"measure": str(m), "params": sum(p.numel() for p in ours.parameters())}
    if m.kind == "mem":
        out["memory"] = memory_pair(m, args, pairs)
        return out
    if m.kind == "guided":
        calls = guided_calls(pairs, m, args.steps, args.scale)
        out["sample_max_abs_diff"] = calls.pop("sample_max_abs_diff")
        repeats, warmup = args.repeats_guided, max(args.warmup - 1, 0)  # the check warmed up
    else:
        calls = (forward_calls if m.kind == "fwd" else backward_calls)(pairs, m)
        repeats, warmup = args.repeats, args.warmup
    out.update(summarise(timing.interleaved(calls, repeats, warmup=warmup)))
    return out


def describe_machine(before: dict, after: dict) -> str:
    """Two lines: the machine (CPU capability, threads, GPU) and the load average around the run."""
    gpu = f"; {before['gpu']}, CUDA {before['cuda']}" if "gpu" in before else ""
    return (
        f"machine: {before['cpu']}; capability {before['cpu_capability']}; torch "
        f"{before['torch']}; threads {before['threads']}; OMP_WAIT_POLICY "
        f"{before['omp_wait_policy']}{gpu}\n"
        f"load average before {before['load_average']}, after {after['load_average']}"
    )


def _row(r: dict) -> str:
    note = (
        f" (samples differ by {r['sample_max_abs_diff']:.1e})" if "sample_max_abs_diff" in r else ""
    )
    lo, hi = r["ratio_iqr"]
    cpu = "" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.2f}"
    return (
        f"| {r['measure']}{note} | {r['params'] / 1e6:.1f} M | {r['adm_s']:.3f} "
        f"| {r['original_s']:.3f} | **{r['ratio']:.2f}** | {r['ratio_min']:.2f}-"
        f"{r['ratio_max']:.2f} | {lo:.2f}-{hi:.2f} | {r['disturbed']}/{r['pairs']} "
        f"| {r['ratio_all_pairs']:.2f} | {cpu} |"
    )


def _memory_line(r: dict, cuda: bool) -> str:
    a, o = r["memory"]["adm"], r["memory"]["original"]
    what = "CUDA max_memory_allocated" if cuda else "peak RSS, a fresh process each"
    return (
        f"memory of one forward+backward, {r['measure']} ({what}): step adm "
        f"+{a['step_mb']:.0f} MB, original +{o['step_mb']:.0f} MB (adm/original "
        f"{a['step_mb'] / max(o['step_mb'], 1e-9):.2f}); peak adm {a['peak_mb']:.0f} MB, original "
        f"{o['peak_mb']:.0f} MB (before the step {a['before_mb']:.0f} / {o['before_mb']:.0f})"
    )


def child_argv(argv: list[str], timed: list[Measure], json_path: str) -> list[str]:
    """The command line of one `--processes` child: the same options, only the timed
    measurements, one process, its figures written to `json_path`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            if arg.startswith("--"):
                skip = False
            else:
                continue
        if arg in ("--processes", "--json", "--measure"):
            skip = True
            continue
        if arg.startswith(("--processes=", "--json=", "--measure=")):
            continue
        out.append(arg)
    return [*out, "--measure", *map(str, timed), "--processes", "1", "--json", json_path]


def across_processes(
    timed: list[Measure], processes: int, argv: list[str], pairs: Pairs
) -> list[dict]:
    """Every timed measurement in `--processes` fresh processes, one after another: for each,
    the median of the processes' median ratios, their min-max, and each process's figures."""
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(processes):
            path = os.path.join(tmp, f"run{i}.json")
            command = [sys.executable, __file__, *child_argv(argv, timed, path)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                raise SystemExit(f"process {i + 1} failed: {done.stderr.strip()[-400:]}")
            with open(path) as f:
                runs.append(json.load(f))
            print(f"done process {i + 1}/{processes}", file=sys.stderr)
    for run in runs:
        for name, rel in run["agreement"].items():
            pairs.agreement[name] = max(pairs.agreement.get(name, 0.0), rel)
        for name, (rel, tensor) in run.get("gradient_agreement", {}).items():
            if rel >= pairs.grad_agreement.get(name, (-1.0, ""))[0]:
                pairs.grad_agreement[name] = (rel, tensor)
    results = []
    for j, m in enumerate(timed):
        per = [run["results"][j] for run in runs]
        ratios = [r["ratio"] for r in per]
        results.append(
            {
                "measure": str(m),
                "params": per[0]["params"],
                "processes": len(per),
                "ratio": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "ratios": ratios,
                "adm_s": statistics.median(r["adm_s"] for r in per),
                "original_s": statistics.median(r["original_s"] for r in per),
                "disturbed": sum(r["disturbed"] for r in per),
                "pairs": sum(r["pairs"] for r in per),
                "loads": [run["env"]["before"]["load_average"][0] for run in runs],
                "runs": per,
            }
        )
    return results


def _process_row(r: dict) -> str:
    each = " ".join(f"{x:.2f}" for x in r["ratios"])
    return (
        f"| {r['measure']} | {r['params'] / 1e6:.1f} M | {r['adm_s']:.3f} | {r['original_s']:.3f} "
        f"| **{r['ratio']:.2f}** | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {each} "
        f"| {r['disturbed']}/{r['pairs']} |"
    )


def report(results: list[dict], pairs: Pairs, env: dict) -> str:
    lines = [
        describe_machine(env["before"], env["after"]) + f"; device {pairs.device}",
        "agreement (max |adm - original| / max |original|, one forward): "
        + ", ".join(f"{k} {v:.1e}" for k, v in pairs.agreement.items()),
    ]
    if pairs.grad_agreement:
        lines.append(
            "gradient agreement (worst input or weight gradient, max |adm - original| / its max, "
            "one fwd+bwd): "
            + ", ".join(f"{k} {v:.1e} ({n})" for k, (v, n) in pairs.grad_agreement.items())
        )
    in_process = [r for r in results if "memory" not in r and "processes" not in r]
    if in_process:
        lines += [
            "",
            "| measurement | params | adm s | original s | original/adm (median) | min-max | IQR "
            "| disturbed pairs | wall, all pairs | CPU time, all pairs |",
            "|---|---:|---:|---:|---:|---|---|---:|---:|---:|",
        ]
        lines += [_row(r) for r in in_process]
    across = [r for r in results if "processes" in r]
    if across:
        lines += [
            "",
            f"across {across[0]['processes']} fresh processes (each: its median ratio over its "
            "undisturbed pairs):",
            "",
            "| measurement | params | adm s (median) | original s (median) | original/adm, median "
            "of the processes | min-max | each process | disturbed pairs |",
            "|---|---:|---:|---:|---:|---|---|---:|",
        ]
        lines += [_process_row(r) for r in across]
    lines += [_memory_line(r, pairs.device.type == "cuda") for r in results if "memory" in r]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not the usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="bench_vs_original.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--original", default=None, help=f"the original's folder (or ${original_code.ENV_VAR})"
    )
    p.add_argument(
        "--measure",
        nargs="+",
        default=None,
        help=f"KIND:NETWORK:BATCH ...; networks {', '.join(NETWORKS)}; default {' '.join(DEFAULT)}",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"tiny networks, 2 pairs: {' '.join(QUICK)}"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed pairs per fwd/fwdbwd measurement (5; quick 2)",
    )
    p.add_argument(
        "--repeats-guided", type=int, default=None, help="timed pairs of guided loops (3; quick 2)"
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before the pairs")
    p.add_argument(
        "--memory-repeats", type=int, default=1, help="subprocess pairs for mem (min kept)"
    )
    p.add_argument(
        "--steps", default=None, help="respacing of the guided loop (ddim25; quick ddim3)"
    )
    p.add_argument("--scale", type=float, default=1.0, help="classifier scale of the guided loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--channels-last", action="store_true", help="adm's networks in NHWC")
    p.add_argument(
        "--checkpoint-attention",
        action="store_true",
        help="adm recomputes attention in backward, as the original does (if adm supports it)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="run the timed measurements in this many fresh processes, one after another, and "
        "report the spread of their median ratios (mem runs once, in its own subprocesses)",
    )
    p.add_argument("--json", default=None, help="also write the raw figures here")
    p.add_argument("--memory-child", choices=["adm", "original"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return _check(args)


def _check(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the quick/default settings; ValueError (one line) for values that cannot run."""
    args.measure = [Measure.parse(t) for t in (args.measure or (QUICK if args.quick else DEFAULT))]
    quick = {"repeats": 2, "repeats_guided": 2, "steps": "ddim3"}
    default = {"repeats": 5, "repeats_guided": 3, "steps": "ddim25"}
    for name, value in (quick if args.quick else default).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("repeats", "repeats_guided", "memory_repeats", "threads", "processes"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.checkpoint_attention and not hasattr(adm_unet, "set_attention_checkpointing"):
        raise ValueError("--checkpoint-attention: this adm has no set_attention_checkpointing")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {args.warmup}")
    try:
        space_timesteps(1000, args.steps)
    except ValueError as err:
        raise ValueError(f"--steps {args.steps!r}: {err}") from None
    if args.device not in ("cpu", "cuda") or (
        args.device == "cuda" and not torch.cuda.is_available()
    ):
        raise ValueError(f"--device {args.device!r}: use cpu, or cuda where a GPU is visible")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        root = original_code.find_original(args.original)
    except (ValueError, original_code.OriginalMissing) as err:
        print(f"bench_vs_original.py: error: {err}", file=sys.stderr)
        return 2
    args.original_root = str(root)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    script_util = original_code.import_original(root)
    options = AdmOptions(args.channels_last or None, args.checkpoint_attention)
    if args.memory_child:
        step = memory_of_step(args.memory_child, args.measure[0], script_util, device, options)
        print(json.dumps(step))
        return 0
    env = {"before": timing.machine(), "command": " ".join(["python", *sys.argv])}
    pairs = Pairs(script_util, device, options)
    results = []
    here = args.measure  # measured in this process; with --processes only mem is
    if args.processes > 1:
        timed, here = [m for m in here if m.kind != "mem"], [m for m in here if m.kind == "mem"]
        command_line = argv if argv is not None else sys.argv[1:]
        results += across_processes(timed, args.processes, command_line, pairs) if timed else []
    for m in here:
        results.append(run_measure(m, args, pairs))
        print(f"done {m}", file=sys.stderr)
    env["after"] = timing.machine()
    print(report(results, pairs, env))
    if args.json:
        raw = {"env": env, "agreement": pairs.agreement, "steps": args.steps, "results": results}
        raw["gradient_agreement"] = pairs.grad_agreement
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
