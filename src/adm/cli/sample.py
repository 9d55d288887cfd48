"""`adm sample`, `adm upsample`, `adm nll`: argument parsing and checks for the sampling commands.

Resolves the model (checkpoint with its preset auto-detected, or a preset), the classifier and the
settings, checks every input before any sampling starts, then makes one call into
`adm.generate.sample` (or `adm.diffusion.gaussian.calc_bpd_loop` for `nll`). Registered by
`adm.cli.main`. torch and numpy are imported inside the commands, so that `--help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from adm._util.errors import UserError
from adm.cli import checks
from adm.diffusion.names import GRID_NAMES, SAMPLER_NAMES

if TYPE_CHECKING:
    import numpy as np
    import torch

SAMPLE_EXAMPLES = """examples:
  adm sample --checkpoint 256x256_diffusion.pt --classifier 256x256_classifier.pt \\
      --classifier-scale 1.0 --steps 250 --sampler ddpm --num-samples 100 --out runs/256
  adm sample --checkpoint 128x128_diffusion --classifier 128x128_classifier \\
      --classifier-scale 1.0 --sampler ddim --steps ddim25 --precision bf16
  adm sample --checkpoint fmnist_diffusion --classifier fmnist_classifier \
      --classes 0,7,9 --num-samples 9 --out runs/fmnist     (bundled with adm: no download)
  adm sample --preset tiny_diffusion --sampler dpm++2m --steps 10 --classes 1,2,3
  torchrun --nproc_per_node 8 -m adm.cli.main sample --checkpoint 64x64_diffusion.pt ...
"""


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="sample images (guided or not) from a diffusion checkpoint or preset",
        description="Sample images with DDPM, DDIM or DPM-Solver++(2M), optionally guided by a "
        "noisy classifier (--classifier-scale) and/or classifier-free guidance (--cfg-scale). "
        "Writes the original's .npz (arr_0 uint8 NHWC, arr_1 labels), grid.png and "
        "settings.json. Sample i depends only on (--seed, i): batch size and process count do "
        "not change the images.",
        epilog=SAMPLE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _model_options(p)
    guidance_options(p)
    p.add_argument("--classes", default="random", help="'random' or a list such as 1,7,207")
    _sampling_options(p)
    p.set_defaults(func=_cmd_sample, accepts_original_flags=True, run_folder="out",
                   stops_cleanly=True)  # fmt: skip

    p = sub.add_parser(
        "upsample",
        help="upsample a base .npz with a super-resolution checkpoint (64->256, 128->512)",
        description="Super-resolve every image of a base sample batch (arr_0 uint8 NHWC, labels "
        "in arr_1) with an upsampler; DDPM, DDIM or DPM-Solver++ (the original's script ignores "
        "--use_ddim).",
    )
    _model_options(p)
    p.add_argument("--base", required=True, help="base samples .npz (e.g. from adm sample)")
    _sampling_options(p, num_samples=None)
    p.set_defaults(func=_cmd_upsample, accepts_original_flags=True, run_folder="out",
                   stops_cleanly=True)  # fmt: skip

    p = sub.add_parser(
        "nll",
        help="bits/dim of images under a diffusion model (the full variational bound)",
        description="Evaluate the negative log-likelihood in bits/dim with the full VLB loop "
        "(one network call per timestep and image batch).",
    )
    _model_options(p)
    p.add_argument("--data", required=True, help=".npz with arr_0 uint8 NHWC images")
    p.add_argument("--num-samples", type=int, default=None, help="first N images (default all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", default="", help="respacing (default: all steps; fewer steps "
                   "bound the respaced chain's likelihood, which is looser)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x0")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="runs/nll", help="output folder for nll.json")
    p.set_defaults(func=_cmd_nll, accepts_original_flags=True)


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help=".pt/.safetensors file, a bundled name (fmnist_diffusion) "
                   "or a released name (cached by adm fetch)")  # fmt: skip
    g.add_argument("--preset", help="build a preset with random weights (tests, smoke runs)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a preset field, e.g. --set diffusion.steps=4000")  # fmt: skip


def guidance_options(p: argparse.ArgumentParser) -> None:
    """--classifier, --classifier-scale, --cfg-scale and --cfg-null-label (sampling, editing)."""
    p.add_argument("--classifier", help="noisy classifier: a checkpoint file, a bundled name "
                   "(fmnist_classifier) or a released name (cached by adm fetch)")  # fmt: skip
    p.add_argument("--classifier-scale", type=float, help="guidance scale s (default: the "
                   "preset's when --classifier is given)")  # fmt: skip
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance weight w")
    p.add_argument("--cfg-null-label", type=int, help="null label (default: the one the model "
                   "was trained with, else the last class index)")  # fmt: skip


def _sampling_options(p: argparse.ArgumentParser, num_samples: int | None = 16) -> None:
    p.add_argument("--sampler", choices=SAMPLER_NAMES,
                   help="default: preset's (docs/sampling.md: each one, its NFE)")  # fmt: skip
    p.add_argument("--steps", help="respacing: 250, ddim25, 10,10,10 ... (default: preset's); "
                   "with --grid, a number of steps")  # fmt: skip
    p.add_argument("--grid", choices=GRID_NAMES, help="timestep grid for --steps N (default: "
                   "the original's respacing of --steps)")  # fmt: skip
    p.add_argument("--eta", type=float, help="ddim: eta (default 0, deterministic); "
                   "dpm++2m-sde: noise amount (default 1)")  # fmt: skip
    p.add_argument("--order", type=int, help="unipc: order 2 (default) or 3")
    p.add_argument("--churn", type=float, help="edm: S_churn (default 80)")
    p.add_argument("--s-noise", type=float, help="edm: S_noise (default 1.003)")
    p.add_argument("--guidance-interval", metavar="LO,HI", help="guide only where sigma = "
                   "sqrt((1-abar)/abar) is in [LO, HI] (Kynkaanniemi et al. 2024)")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=num_samples,
                   help=f"default: {num_samples or 'all base images'}")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=None, help="default: preset's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                   help="autocast precision on CUDA (default: the preset's, e.g. fp16 as the "
                   "original sampled); the CPU always runs fp32")  # fmt: skip
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x0 to [-1, 1]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if present)")
    p.add_argument("--out", default="runs/sample", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--save-pngs", action="store_true", help="also write one PNG per image")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--compile", action="store_true", help=checks.COMPILE_HELP)
    p.add_argument("--memory-format", choices=MEMORY_FORMATS, default="auto",
                   help="the networks' memory format: auto = channels_last (docs/speed.md); "
                   "samples agree to float32 roundoff")  # fmt: skip


def _load(args: argparse.Namespace, device: torch.device):
    """(model, preset) from --checkpoint or --preset, with --set / original flags applied."""
    import torch

    from adm.models import checkpoint, presets
    from adm.models.overrides import apply_overrides

    overrides = [*args.set, *args.original_flags]
    try:
        if args.preset:
            preset = presets.get_preset(args.preset)
            if overrides:
                preset = apply_overrides(preset, overrides)
            torch.manual_seed(0)
            model = presets.build_model(preset).to(device).eval()
            print(
                f"warning: {preset.name} built with random weights (no checkpoint)", file=sys.stderr
            )
            return model, preset
        preset = None
        if overrides:
            found = checkpoint.load_model(args.checkpoint, device="meta")[1]
            preset = apply_overrides(found, overrides)
        return checkpoint.load_model(args.checkpoint, device=device, preset=preset)
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from None


def _device(name: str | None) -> torch.device:
    import torch

    from adm._util.dist import pick_device

    try:  # under torchrun each process takes its own GPU (LOCAL_RANK)
        device = pick_device(name, int(os.environ.get("LOCAL_RANK", "0")))
    except RuntimeError as err:
        raise UserError(f"--device {name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def _job(args, preset, device, classes=None, classifier_scale=0.0, cfg=None):
    from adm.diffusion import registry
    from adm.generate.sample import SampleJob

    s = preset.sampling
    sampler = args.sampler or s.sampler
    default_steps = s.steps if sampler in ("ddpm", "ddim") else "25"  # the paper's, or 25 evenly
    steps = args.steps or default_steps
    precision = args.precision or (s.precision if device.type == "cuda" else "fp32")
    batch_size = s.batch_size if args.batch_size is None else args.batch_size
    interval = _parse_interval(args.guidance_interval)
    if interval is not None and not (classifier_scale or cfg is not None):
        raise UserError("--guidance-interval needs guidance (--classifier-scale or --cfg-scale)")
    try:
        job = SampleJob(
            sampler=sampler, steps=steps, grid=args.grid, num_samples=args.num_samples,
            batch_size=batch_size, classes=classes, seed=args.seed,
            classifier_scale=classifier_scale, cfg_scale=cfg, guidance_interval=interval,
            eta=args.eta, order=args.order, churn=args.churn, s_noise=args.s_noise,
            clip_denoised=not args.no_clip, precision=precision, save_pngs=args.save_pngs,
        )  # fmt: skip
        count = job.num_steps(preset.diffusion)  # the grid / respacing is valid
    except ValueError as err:
        raise UserError(_option_names(str(err))) from None
    need = registry.sampler_info(sampler).min_steps
    if count < need:
        raise UserError(f"--sampler {sampler} needs --steps of at least {need}, got {count}")
    return job


def _option_names(message: str) -> str:
    """A library message about a sampler option, in the flag's spelling (s_noise -> --s-noise)."""
    for key in ("eta", "order", "churn", "s_noise"):
        message = message.replace(f"option '{key}'", f"option --{key.replace('_', '-')}")
        message = message.replace(f"{key} of sampler", f"--{key.replace('_', '-')} of sampler")
    return message


def _parse_interval(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--guidance-interval {text!r}: expected LO,HI such as 0.3,5") from None
    if not (0 <= lo <= hi) or hi != hi:
        raise UserError(f"--guidance-interval {text!r}: expected 0 <= LO <= HI (sigma values)")
    return lo, hi


def _parse_classes(text: str) -> tuple[int, ...] | None:
    if text == "random":
        return None
    try:
        classes = tuple(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise UserError(f"--classes {text!r}: expected 'random' or integers like 1,7,207") from None
    if not classes or min(classes) < 0:
        raise UserError(f"--classes {text!r}: expected non-negative class indices")
    return classes


def _check_sampling_options(args: argparse.Namespace) -> None:
    """Counts and eta of `sample`/`upsample`, before any model loads."""
    checks.at_least(args, {"num_samples": 1, "batch_size": 1, "seed": 0})
    checks.finite(args, "eta", "classifier_scale", "cfg_scale", "churn", "s_noise")
    checks.in_range(args, "eta", 0.0)  # the sampler's own range is checked with the job


def _cmd_sample(args: argparse.Namespace) -> int:
    from adm.generate.sample import Run

    _check_sampling_options(args)
    classes = _parse_classes(args.classes)
    device = _device(args.device)
    model, preset = _load(args, device)
    if preset.kind != "diffusion":
        hint = " (use adm upsample)" if preset.kind == "superres" else ""
        raise UserError(f"{preset.name} is a {preset.kind} model, not a diffusion model{hint}")
    net = preset.network
    classifier, scale = load_classifier(args, preset, device)
    num_classes = net.num_classes
    if classifier is not None:
        n_clf = classifier.config.out_channels
        num_classes = n_clf if num_classes is None else min(num_classes, n_clf)
    null_label, model_null = None, preset.sampling.null_label
    if args.cfg_scale is not None:
        null_label = checks.cfg_null_label(args.cfg_null_label, model_null, net.num_classes)
    num_classes = checks.sampled_classes(num_classes, net.num_classes, null_label, model_null)
    if classes and num_classes is None:
        raise UserError(
            f"--classes: {preset.name} is unconditional and there is no --classifier to steer it "
            "towards classes; add --classifier CKPT (with --classifier-scale), or drop --classes"
        )
    if classes and num_classes is not None and max(classes) >= num_classes:
        raise UserError(f"--classes: class {max(classes)} is out of range (0..{num_classes - 1})")
    job = _job(args, preset, device, classes, scale or 0.0, args.cfg_scale)
    run = Run(
        model=model, diffusion_config=preset.diffusion, job=job, out_dir=Path(args.out),
        num_classes=num_classes, class_conditional=net.num_classes is not None,
        classifier=classifier, null_label=null_label,
        settings={"model": preset.name, "checkpoint": args.checkpoint,
                  "classifier": args.classifier, "device": str(device),
                  **digests(checkpoint=args.checkpoint, classifier=args.classifier)},
    )  # fmt: skip
    return _run(run, args)


def digests(**files: str | None) -> dict[str, str]:
    """`<name>_sha256` of each input file given: a run's identity, so that `--resume` refuses a
    checkpoint replaced at the same path (samples of two models in one batch set)."""
    from adm._util.digest import sha256_file
    from adm.models.checkpoint import resolve_checkpoint

    out = {}
    for name, given in files.items():
        if given:
            path = resolve_checkpoint(given) if name != "base" else given
            out[f"{name}_sha256"] = sha256_file(path)
    return out


def load_classifier(args: argparse.Namespace, preset, device: torch.device):
    """(classifier, scale) from --classifier and --classifier-scale, checked against the
    diffusion model's `preset` (a classifier, at its resolution); (None, 0.0) without one. The
    scale defaults to the preset's recommended one."""
    from adm.models import checkpoint

    if not args.classifier:
        if args.classifier_scale:
            raise UserError("--classifier-scale needs --classifier CKPT")
        return None, 0.0
    try:
        classifier, clf_preset = checkpoint.load_model(args.classifier, device=device)
    except (ValueError, OSError) as err:
        raise UserError(f"--classifier: {err}") from None
    problem = classifier_mismatch(args.classifier, clf_preset, preset)
    if problem:
        raise UserError(problem)
    scale = args.classifier_scale
    return classifier, preset.sampling.classifier_scale if scale is None else scale


def classifier_mismatch(path: str, clf_preset, preset) -> str | None:
    """Why the model loaded from `--classifier path` cannot guide the diffusion model of
    `preset` (not a classifier, another resolution), or None when it can."""
    if clf_preset.kind != "classifier":
        return f"--classifier {path} is a {clf_preset.kind} model"
    if clf_preset.network.image_size != preset.network.image_size:
        return (
            f"--classifier {path} works at {clf_preset.network.image_size}px but the model "
            f"samples {preset.network.image_size}px images"
        )
    return None


def prepare_networks(
    model: torch.nn.Module,
    classifier: torch.nn.Module | None,
    *,
    memory_format: str = "auto",
    compile: bool = False,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The diffusion network and classifier through `runtime.prepare_model` on their device:
    frozen for inference, in `memory_format` (auto: prepare_model's choice), compiled if asked.
    Every sampling command uses this, so that their samples agree bit for bit."""
    from adm._util.runtime import prepare_model

    device = next(model.parameters()).device
    fmt = {"auto": None, "channels_last": True, "contiguous": False}[memory_format]
    model = prepare_model(model, device=device, channels_last=fmt, compile=compile, label="model")
    if classifier is not None:
        classifier = prepare_model(
            classifier, device=device, channels_last=fmt, compile=compile, label="classifier"
        )
    return model, classifier


def _run(run, args: argparse.Namespace) -> int:
    from adm.generate.sample import NonFiniteError, run_sampling

    model, classifier = prepare_networks(
        run.model, run.classifier, memory_format=args.memory_format, compile=args.compile
    )
    run = dataclasses.replace(run, model=model, classifier=classifier)
    try:
        paths = run_sampling(run, resume=args.resume, progress=not args.no_progress)
    except ValueError as err:
        raise UserError(str(err)) from None
    except NonFiniteError as err:
        print(f"adm {args.command}: error: {err}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _cmd_upsample(args: argparse.Namespace) -> int:
    import numpy as np

    from adm.generate.sample import Run
    from adm.models.presets import PRESETS, RELEASED

    _check_sampling_options(args)
    device = _device(args.device)
    model, preset = _load(args, device)
    if preset.kind != "superres":
        released = [n for n in RELEASED if PRESETS[n].kind == "superres"]
        raise UserError(
            f"{preset.name} is a {preset.kind} model, not an upsampler (released upsamplers: "
            f"{', '.join(released)}, downloaded by adm fetch NAME; none is bundled with adm)"
        )
    base = _read_images(args.base, "--base")
    small = preset.small_size
    if (
        base["arr_0"].shape[1:3] != (small, small)
        or base["arr_0"].shape[3] != preset.network.in_channels
    ):
        raise UserError(
            f"--base {args.base}: images are {tuple(base['arr_0'].shape[1:])}, but "
            f"{preset.name} upsamples {small}x{small}x{preset.network.in_channels} images"
        )
    n = len(base["arr_0"])
    if n == 0:
        raise UserError(f"--base {args.base}: holds no images (arr_0 is empty)")
    net = preset.network
    labels = base.get("arr_1")
    if net.num_classes is not None:
        if labels is None:
            raise UserError(
                f"--base {args.base}: no labels (arr_1) for a class-conditional upsampler"
            )
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise UserError(
                f"--base {args.base}: arr_1 must hold one integer label per image ({n}), got "
                f"{labels.dtype} {tuple(labels.shape)}"
            )
        if labels.min() < 0 or labels.max() >= net.num_classes:
            bad = labels.min() if labels.min() < 0 else labels.max()
            raise UserError(
                f"--base {args.base}: label {bad} is out of range (0..{net.num_classes - 1})"
            )
    args.num_samples = n if args.num_samples is None else min(args.num_samples, n)
    job = _job(args, preset, device)
    run = Run(
        model=model, diffusion_config=preset.diffusion, job=job, out_dir=Path(args.out),
        num_classes=net.num_classes, class_conditional=net.num_classes is not None,
        low_res=base["arr_0"][: job.num_samples],
        labels=(labels if labels is not None else np.zeros(n, int))[: job.num_samples],
        settings={"model": preset.name, "checkpoint": args.checkpoint, "base": args.base,
                  **digests(checkpoint=args.checkpoint, base=args.base)},
    )  # fmt: skip
    return _run(run, args)


def _read_images(path: str, flag: str) -> dict[str, np.ndarray]:
    import numpy as np

    from adm._util.npz import NpzError, load_npz

    try:
        arrays = load_npz(path, ("arr_0", "arr_1"))  # a missing file: "{path}: no such file"
    except NpzError as err:
        raise UserError(f"{flag} {err}") from None
    images = arrays.get("arr_0")
    if images is None or images.dtype != np.uint8 or images.ndim != 4:
        raise UserError(f"{flag} {path}: expected arr_0 uint8 images [N, H, W, C]")
    return arrays


def _cmd_nll(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from adm._util.atomic import atomic_path
    from adm.diffusion.gaussian import Diffusion, calc_bpd_loop

    checks.at_least(args, {"num_samples": 1, "batch_size": 1, "seed": 0})
    checks.writable_dir(args.out)
    device = _device(args.device)
    model, preset = _load(args, device)
    if preset.kind != "diffusion":
        raise UserError(f"{preset.name} is a {preset.kind} model, not a diffusion model")
    arrays = _read_images(args.data, "--data")
    images = arrays["arr_0"][: args.num_samples]
    size, ch = preset.network.image_size, preset.network.in_channels
    if images.shape[1:] != (size, size, ch):
        raise UserError(
            f"--data {args.data}: images are {images.shape[1:]}, model needs {(size, size, ch)}"
        )
    labels = None
    if preset.network.num_classes is not None:
        if "arr_1" not in arrays:
            raise UserError(f"--data {args.data}: a class-conditional model needs labels (arr_1)")
        labels = arrays["arr_1"][: len(images)].astype(np.int64)
        if labels.min() < 0 or labels.max() >= preset.network.num_classes:
            raise UserError(
                f"--data {args.data}: labels outside 0..{preset.network.num_classes - 1}"
            )
    out_dir = Path(args.out)
    try:
        diff = Diffusion.from_config(
            dataclasses.replace(preset.diffusion, timestep_respacing=args.steps)
        )
    except ValueError as err:
        raise UserError(f"--steps: {err}") from None
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    totals, terms = [], []
    bar = tqdm(total=len(images), unit="img", desc="bits/dim")
    for start in range(0, len(images), args.batch_size):
        x0 = torch.from_numpy(images[start : start + args.batch_size]).to(device)
        x0 = x0.permute(0, 3, 1, 2).float() / 127.5 - 1
        kwargs = {}
        if labels is not None:
            kwargs["y"] = torch.from_numpy(labels[start : start + len(x0)]).to(device)
        out = calc_bpd_loop(
            diff, model, x0, clip_denoised=not args.no_clip, model_kwargs=kwargs, generator=gen
        )
        totals.append(out["total_bpd"].cpu())
        terms.append(out["vb"].cpu())
        bar.update(len(x0))
        bar.set_postfix(bpd=f"{torch.cat(totals).mean():.4f}")
    bar.close()
    total = torch.cat(totals)
    result = {
        "bits_per_dim": float(total.mean()),
        "num_images": len(total),
        "model": preset.name,
        "steps": args.steps or str(preset.diffusion.steps),
        "vb_per_timestep_loop_order": torch.cat(terms).mean(0).tolist(),
        "diffusion": dataclasses.asdict(preset.diffusion),
    }
    with atomic_path(out_dir / "nll.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"bits/dim: {result['bits_per_dim']:.4f} over {len(total)} images -> {out_dir / 'nll.json'}"
    )
    return 0
