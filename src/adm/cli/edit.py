"""`adm inpaint` and `adm edit`: argument parsing and checks for the editing commands.

Reads the images (and masks), resolves the model, the classifier and the classes, checks every
input against the model before any network runs, then makes one call into `adm.generate.edit`.
Registered by `adm.cli.main`; torch and numpy are imported inside the commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adm._util.errors import UserError
from adm.cli import checks
from adm.cli import sample as cli_sample
from adm.diffusion.names import GRID_NAMES, SAMPLER_NAMES

INPAINT_EXAMPLES = """examples:
  adm inpaint --checkpoint fmnist_diffusion --images in.npz --masks right_half.npz \\
      --steps 50 --jump 10 --resample 10 --out runs/repaint      (RePaint, r = 10, j = 10)
  adm inpaint --checkpoint fmnist_diffusion --images in.npz --masks mask.png_folder \\
      --resample 1                                               (plain replacement)
  adm inpaint --checkpoint fmnist_diffusion --classifier fmnist_classifier \\
      --classifier-scale 4 --classes labels --images in.npz --masks m.npz  (guided to arr_1)
  adm inpaint --checkpoint 256x256_diffusion_uncond.pt --images photos/ --masks masks/ \\
      --steps 250 --jump 10 --resample 10                        (RePaint's own setting)
  adm inpaint --checkpoint fmnist_diffusion --images in.npz --masks m.npz \\
      --sampler dpm++2m-sde --grid karras --steps 20             (fast replacement)
"""

EDIT_EXAMPLES = """examples:
  adm edit --checkpoint fmnist_diffusion --images sneakers.npz --strength 0.5 \\
      --classifier fmnist_classifier --classifier-scale 8 --classes 5   (sneaker -> sandal)
  adm edit --checkpoint fmnist_diffusion --images in/ --strength 0.3 --sampler dpm++2m --steps 20
"""


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inpaint",
        help="fill in masked regions of images (RePaint resampling or plain replacement)",
        description="Inpaint images where the mask is black: at every step the known region "
        "(mask white; grey levels >= 128) is replaced by the forward-noised input, and with "
        "--resample r > 1 RePaint re-noises every --jump j steps and denoises again, r times "
        "(DDPM or DDIM; the multistep solvers do replacement only). Classifier or "
        "classifier-free guidance towards --classes. The known "
        "pixels of the output equal the input exactly. Writes edits_*.npz, grid.png (input | "
        "mask | output) and settings.json.",
        epilog=INPAINT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--masks", help="npz (arr_0 [N or 1, H, W] uint8/bool) or folder of grey "
                   "images; white (>= 128) = keep")  # fmt: skip
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddpm", help="ddpm or ddim "
                   "(replacement and RePaint), dpm++2m, dpm++3m, dpm++2m-sde or unipc "
                   "(replacement only); default ddpm")  # fmt: skip
    p.add_argument("--steps", default="50", help="respacing: 50, ddim25, ... (default 50); "
                   "with --grid, a number of steps")  # fmt: skip
    p.add_argument("--grid", choices=GRID_NAMES, help="timestep grid for --steps N, as in "
                   "adm sample (e.g. karras for dpm++2m)")  # fmt: skip
    p.add_argument("--jump", type=int, help="RePaint's jump length j (default: 10, or fewer "
                   "when there are fewer steps)")  # fmt: skip
    p.add_argument("--resample", type=int, default=1, help="RePaint's resamplings r (default "
                   "1: plain replacement; the paper uses 10)")  # fmt: skip
    p.add_argument("--eta", type=float, help="ddim: eta (default 0); dpm++2m-sde: eta "
                   "(default 1)")  # fmt: skip
    p.add_argument("--order", type=int, help="unipc: order 2 or 3")
    p.set_defaults(func=_cmd_inpaint, mode="inpaint", run_folder="out", stops_cleanly=True)

    p = sub.add_parser(
        "edit",
        help="image-to-image (SDEdit): noise images to t = S*T and denoise, e.g. towards a class",
        description="Noise every image to t = strength*T and denoise it with any sampler, "
        "optionally guided towards --classes (class translation). Strength 0 returns the input, "
        "1 ignores it. Writes edits_*.npz, grid.png (input | output) and settings.json.",
        epilog=EDIT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(p)
    p.add_argument("--strength", type=float, required=True, help="S in [0, 1]")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim")
    p.add_argument("--steps", default="50", help="steps of a whole-chain run; the edit takes "
                   "round(S*steps) of them (default 50)")  # fmt: skip
    p.add_argument("--eta", type=float, help="ddim / dpm++2m-sde: eta")
    p.add_argument("--order", type=int, help="unipc: order 2 or 3")
    p.add_argument("--churn", type=float, help="edm: S_churn")
    p.add_argument("--s-noise", type=float, help="edm: S_noise")
    p.set_defaults(func=_cmd_edit, mode="sdedit", run_folder="out", stops_cleanly=True)


def _common(p: argparse.ArgumentParser) -> None:
    cli_sample._model_options(p)
    p.add_argument("--images", required=True, help="npz (arr_0 uint8 [N, H, W, C] or [N, H, W], "
                   "labels in arr_1) or a folder of PNG/JPEG images")  # fmt: skip
    cli_sample.guidance_options(p)
    p.add_argument("--classes", help="classes to guide towards: a list such as 5 or 1,7 (cycled "
                   "over the images) or 'labels' for the --images npz's arr_1")  # fmt: skip
    p.add_argument("--num-images", type=int, help="edit only the first N images")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-clip", action="store_true", help="do not clip predicted x0 to [-1, 1]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA if present)")
    p.add_argument("--out", default="runs/edit", help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--no-progress", action="store_true")


def _cmd_inpaint(args: argparse.Namespace) -> int:
    if not args.masks:
        raise UserError("adm inpaint needs --masks (white where the image is kept)")
    return _cmd(args)


def _cmd_edit(args: argparse.Namespace) -> int:
    if not 0 <= args.strength <= 1:  # NaN fails too
        raise UserError(f"--strength must be in [0, 1], got {args.strength:g}")
    return _cmd(args)


def _cmd(args: argparse.Namespace) -> int:
    from adm.generate import edit, edit_io

    checks.at_least(args, {"batch_size": 1, "seed": 0, "num_images": 1})
    checks.at_least(args, {"jump": 1, "resample": 1} if args.mode == "inpaint" else {})
    checks.in_range(args, "eta", 0.0)
    checks.writable_dir(args.out)
    try:
        images, stored = edit_io.read_images(args.images)
        masks = edit_io.read_masks(args.masks) if args.mode == "inpaint" else None
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.num_images is not None:
        images = images[: args.num_images]
        stored = None if stored is None else stored[: args.num_images]
    device = cli_sample._device(args.device)
    model, preset = cli_sample._load(args, device)
    if preset.kind != "diffusion":
        raise UserError(f"{preset.name} is a {preset.kind} model, not a diffusion model")
    net = preset.network
    try:
        edit_io.check_inputs(images, masks, net.image_size, net.in_channels)
    except ValueError as err:
        raise UserError(str(err)) from None
    classifier, scale = cli_sample.load_classifier(args, preset, device)
    null_label, num_classes = _null_label(args, preset)
    if classifier is not None:
        n_clf = classifier.config.out_channels
        num_classes = n_clf if num_classes is None else min(num_classes, n_clf)
    labels = _labels(args, stored, len(images), num_classes, net.num_classes is not None)
    job = _job(args, preset, scale)
    model, classifier = cli_sample.prepare_networks(model, classifier)
    run = edit.EditRun(
        model=model, diffusion_config=preset.diffusion, job=job, out_dir=Path(args.out),
        images=images, masks=masks, labels=labels, class_conditional=net.num_classes is not None,
        classifier=classifier, null_label=null_label,
        settings={"model": preset.name, "checkpoint": args.checkpoint, "images": args.images,
                  "masks": args.masks if args.mode == "inpaint" else None,
                  "classifier": args.classifier, "classes": args.classes, "device": str(device),
                  **cli_sample.digests(checkpoint=args.checkpoint, classifier=args.classifier)},
    )  # fmt: skip
    try:
        paths = edit.run_editing(run, resume=args.resume, progress=not args.no_progress)
    except ValueError as err:
        raise UserError(str(err)) from None
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _job(args: argparse.Namespace, preset, scale: float):
    from adm.generate.edit import EditJob
    from adm.generate.sample import diffusion_on_steps

    jump = getattr(args, "jump", None)
    if args.mode == "inpaint":
        try:
            steps = diffusion_on_steps(preset.diffusion, args.steps, args.grid).num_steps
        except ValueError as err:
            raise UserError(f"--steps {args.steps}: {err}") from None
        if jump is not None and (jump > steps or (args.resample > 1 and jump == steps)):
            raise UserError(
                f"--jump {jump} must be smaller than the number of steps ({steps}) to resample"
            )
        jump = jump or min(10, max(1, steps - 1))
    try:
        job = EditJob(
            mode=args.mode, sampler=args.sampler, steps=args.steps,
            grid=getattr(args, "grid", None), jump=jump or 10,
            resample=getattr(args, "resample", 1), strength=getattr(args, "strength", 0.5),
            batch_size=args.batch_size, seed=args.seed, classifier_scale=scale,
            cfg_scale=args.cfg_scale, eta=args.eta, order=getattr(args, "order", None),
            churn=getattr(args, "churn", None), s_noise=getattr(args, "s_noise", None),
            clip_denoised=not args.no_clip,
        )  # fmt: skip
        job.nfe(preset.diffusion)  # the respacing, jump and the edit's steps are valid
    except ValueError as err:
        raise UserError(cli_sample._option_names(str(err))) from None
    return job


def _null_label(args: argparse.Namespace, preset):
    model_classes, model_null = preset.network.num_classes, preset.sampling.null_label
    null = None
    if args.cfg_scale is not None:
        null = checks.cfg_null_label(args.cfg_null_label, model_null, model_classes)
    return null, checks.sampled_classes(model_classes, model_classes, null, model_null)


def _labels(args, stored, n: int, num_classes: int | None, conditional: bool):
    """The class of every image to guide towards (None: no classes)."""
    import numpy as np

    guided = args.classifier is not None or args.cfg_scale is not None or conditional
    if args.classes is None:
        if guided:
            raise UserError("--classes is needed to guide (or for a class-conditional model): "
                            "a list such as 5 or 1,7, or 'labels' for the npz's arr_1")  # fmt: skip
        return None
    if num_classes is None:
        raise UserError("--classes: the model is unconditional and there is no --classifier")
    if args.classes == "labels":
        if stored is None:
            raise UserError(f"--classes labels: --images {args.images} holds no labels (arr_1)")
        labels = stored
    else:
        classes = cli_sample._parse_classes(args.classes)
        if classes is None:
            raise UserError("--classes: give a list such as 5 or 1,7, or 'labels'")
        labels = np.array([classes[i % len(classes)] for i in range(n)])
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise UserError(f"--classes: class {int(bad[0])} is out of range (0..{num_classes - 1})")
    return labels.astype(np.int64)
