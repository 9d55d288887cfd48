"""Sampling speed: images/s of unguided and classifier-guided sampling at 25 steps.

Usage:
    python benchmarks/bench_sample.py                      # CPU: tiny preset, DDIM and DPM-Solver++
    python benchmarks/bench_sample.py --solvers            # every sampler vs its network calls
    python benchmarks/bench_sample.py --device cuda --preset 256x256_diffusion \
        --classifier 256x256_classifier --precision bf16 --batch-size 8

`--solvers` times each sampler of `adm.diffusion.registry` against the bare network calls it
makes (NFE forwards, plus the classifier's forward and backward when guided), and the sampler
alone with networks that answer at once, interleaved: own / calls is the cost of the solver's
arithmetic per step relative to its network calls (issue 11's target: at most 5%).

Weights are random (speed does not depend on them). Each configuration runs --repeats times after
one warm-up; repetitions more than 25% slower than the fastest are flagged as disturbed by other
load (this machine is shared) and left out of the reported figure rather than averaged in.
"""

from __future__ import annotations

import argparse
import dataclasses

import timing
import torch

from adm._util import runtime
from adm.diffusion import guidance, registry, samplers, solvers
from adm.diffusion.gaussian import Diffusion
from adm.generate.sample import sample_generator
from adm.models import presets


def _build(name: str, device: torch.device) -> torch.nn.Module:
    preset = presets.get_preset(name)
    torch.manual_seed(0)
    model = presets.build_model(preset, device=device)
    with torch.no_grad():
        for p in model.parameters():  # fresh ADM nets are zero-initialised: perturb them
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny_diffusion")
    parser.add_argument("--classifier", default="tiny_classifier")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--solvers", action="store_true", help="solver overhead per step")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, clf = _build(args.preset, device), _build(args.classifier, device)
    preset = presets.get_preset(args.preset)
    cfg = preset.network
    n = args.batch_size
    y = torch.arange(n, device=device) % min(cfg.num_classes or 10, clf.config.out_channels)
    gens = [sample_generator(0, i, 0, device) for i in range(n)]
    noise = torch.stack(
        [torch.randn(cfg.in_channels, cfg.image_size, cfg.image_size, generator=g, device=device)
         for g in gens]
    )  # fmt: skip

    def model_fn(x, t, y=None):
        return model(x, t, y=y) if cfg.num_classes else model(x, t)

    threads = torch.get_num_threads()
    print(f"# {args.preset} + {args.classifier}, batch {n}, {args.steps} steps, {args.precision}")
    print(f"# device {device}, torch {torch.__version__}, {threads} CPU threads")
    if args.solvers:
        return solver_overhead(args, preset, model_fn, clf, noise, y, gens, device)
    print(f"{'sampler':10} {'guidance':10} {'s/batch':>8} {'img/s':>8}  repeats (s; * disturbed)")
    for sampler_name, respacing in (("ddim", f"ddim{args.steps}"), ("dpm++2m", str(args.steps))):
        diff = Diffusion.from_config(
            dataclasses.replace(preset.diffusion, timestep_respacing=respacing)
        )
        sampler = samplers.ddim_sample if sampler_name == "ddim" else solvers.dpm_solver_sample
        results = {}
        for label, cond_fn in (
            ("none", None),
            ("classifier", guidance.classifier_cond_fn(clf, 1.0)),
        ):

            def run(cond_fn=cond_fn, sampler=sampler, diff=diff):
                with runtime.autocast(device, args.precision):
                    sampler(model_fn, diff, noise, cond_fn=cond_fn, model_kwargs={"y": y})

            timed = timing.repeat(run, args.repeats)
            results[label] = mean = timed.mean
            print(f"{sampler_name:10} {label:10} {mean:8.2f} {n / mean:8.2f}  {timed.describe()}")
        share = 1 - results["none"] / results["classifier"]
        print(f"{sampler_name:10} classifier share of guided time: {share:.0%}")


def solver_overhead(args, preset, model_fn, clf, noise, y, gens, device) -> None:
    """Each sampler's own arithmetic against the network calls it makes, timed interleaved.

    Three runs per sampler and guidance, alternating so that all see the same load: `calls`, the
    bare network calls (NFE forwards, plus the classifier's forward and backward when guided);
    `own`, the sampler with networks that return a stored output at once (so only the sampler's
    arithmetic, guidance shift included, is left); `full`, the sampler with the real networks.
    The overhead per step is own / calls: measured directly, not as the difference of two noisy
    timings, so it resolves a few percent even on a shared machine."""
    import os

    diff = Diffusion.from_config(preset.diffusion).grid("logsnr", args.steps)
    times = diff.schedule.timestep_map.tolist()[::-1]
    with torch.no_grad():
        stored_out = model_fn(noise, torch.full((len(noise),), times[0], device=device), y=y)
    real_cond = guidance.classifier_cond_fn(clf, 1.0)
    stored_grad = real_cond(noise, torch.full((len(noise),), times[0], device=device), y=y)

    def null_model(x, t, y=None):
        return stored_out

    def null_cond(x, t, y=None):
        return stored_grad

    print(f"# load average {os.getloadavg()[0]:.2f} at start; "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}")  # fmt: skip
    print(f"{'sampler':12} {'guidance':10} {'NFE':>4} {'calls s':>8} {'own s':>8} "
          f"{'overhead':>8} {'full s':>8} {'full/calls':>10}")  # fmt: skip
    worst = 0.0
    for guided in (False, True):
        cond_fn = real_cond if guided else None
        for name in registry.SAMPLER_NAMES:
            calls = registry.nfe(name, args.steps)

            def bare(calls=calls, cond_fn=cond_fn):
                with torch.no_grad():
                    for k in range(calls):
                        t = torch.full((len(noise),), times[k % len(times)], device=device)
                        model_fn(noise, t, y=y)
                        if cond_fn is not None:
                            cond_fn(noise, t, y=y)

            def run(name=name, net=model_fn, cond=cond_fn):
                gen = [torch.Generator(device).manual_seed(int(g.initial_seed())) for g in gens]
                registry.sample(name, net, diff, noise, cond_fn=cond, model_kwargs={"y": y},
                                generator=gen)  # fmt: skip

            def own(name=name, guided=guided):
                run(name, null_model, null_cond if guided else None)

            t_calls, t_own, t_full = [], [], []
            for _ in range(args.repeats):  # interleaved, so all three see the same load
                t_calls.append(timing.repeat(bare, 1).best)
                t_own.append(timing.repeat(own, 1).best)
                t_full.append(timing.repeat(run, 1).best)
            overhead = min(t_own) / min(t_calls)
            worst = max(worst, overhead)
            label = "classifier" if guided else "none"
            full = min(t_full)
            print(f"{name:12} {label:10} {calls:4d} {min(t_calls):8.3f} {min(t_own):8.4f} "
                  f"{overhead:8.2%} {full:8.3f} {full / min(t_calls):10.3f}")  # fmt: skip
    print(f"# largest overhead {worst:.2%} of the network calls (target: at most 5%)")
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
