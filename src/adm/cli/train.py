"""`adm train`, `adm train-classifier`, `adm train-superres`: argument parsing for training.

Resolves the preset (a name, a checkpoint to fine-tune, or the original's model flags), the
`--set` overrides and the original training scripts' flags (`--lr_anneal_steps`, `--ema_rate`,
`--batch_size` per rank, ...), then makes one call: `adm.training.loop.prepare` and
`adm.training.loop.train`.
Registered by `adm.cli.main`; run under `torchrun --nproc_per_node N` for several processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from adm._util.errors import UserError, os_error_text
from adm.cli import checks

EXAMPLES = """examples:
  adm train --preset tiny_diffusion --data images/ --out runs/tiny --steps 2000 --fit-classes
  adm train --data imagenet/train --out runs/64 --preset 64x64_diffusion --steps 540000 \\
      --batch-size 2048 --lr 3e-4 --ema-rate 0.9999 --precision bf16
  torchrun --nproc_per_node 8 -m adm.cli.main train --preset 256x256_diffusion_uncond \\
      --init-from 256x256_diffusion_uncond --data faces/ --out runs/ft --steps 20000 --lr 1e-5
  adm train --data_dir images/ --out runs/orig --steps 1000 \\
      --image_size 64 --num_channels 128 --num_res_blocks 3 --learn_sigma True   (original flags)
  adm train-classifier --preset tiny_classifier --data images/ --out runs/clf --steps 500 \\
      --fit-classes --anneal-lr
"""

KINDS = {"train": "diffusion", "train-superres": "superres", "train-classifier": "classifier"}

# The original scripts' own flags (image_train.py, super_res_train.py, classifier_train.py).
_SCRIPT_FLAGS = {
    "data_dir", "val_data_dir", "schedule_sampler", "lr", "weight_decay", "lr_anneal_steps",
    "batch_size", "microbatch", "ema_rate", "log_interval", "save_interval", "eval_interval",
    "resume_checkpoint", "use_fp16", "fp16_scale_growth", "noised", "iterations", "anneal_lr",
    "classifier_use_fp16",
}  # fmt: skip


def add_commands(sub: argparse._SubParsersAction) -> None:
    helps = {
        "train": "train a diffusion model (the paper's recipe; torchrun for several GPUs)",
        "train-classifier": "train a noisy classifier for guidance (top-1/top-5 on held-out data)",
        "train-superres": "train a super-resolution diffusion model (area-downsampled inputs)",
    }
    for name, text in helps.items():
        p = sub.add_parser(
            name, help=text, description=text + ". Rerunning the same command continues the run "
            "in --out from its latest checkpoint.", epilog=EXAMPLES, allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        _options(p, KINDS[name])
        p.set_defaults(func=_cmd_train, accepts_original_flags=True, train_kind=KINDS[name],
                       run_folder="out", stops_cleanly=True)  # fmt: skip


def _options(p: argparse.ArgumentParser, kind: str) -> None:
    a = p.add_argument
    a("--data", help="image folder (recursive), .npz (arr_0 NHWC uint8, arr_1 labels) or a folder "
      "of MNIST-style IDX files")  # fmt: skip
    a("--out", required=True, help="run folder: checkpoints, log.csv, loss.png, sample grids")
    a("--preset", help="network + diffusion preset (adm presets lists them)")
    a("--init-from", help="fine-tune: start from this checkpoint (file or released name)")
    a("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
      help="override a preset field, e.g. --set unet.dropout=0.1")  # fmt: skip
    a("--steps", type=int, help="total optimisation steps")
    a("--batch-size", type=int, help="GLOBAL batch size over all processes (default 8)")
    a("--microbatch", type=int, help="images per forward/backward on one process (-1: all)")
    a("--lr", type=float, help="learning rate (default 1e-4; classifier 3e-4)")
    a("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    a("--anneal-lr", action="store_true", default=None,
      help="anneal the LR linearly to 0 at --steps: lr·(1 − step/steps); rerun with a larger "
      "--steps to continue the anneal over the new total (docs/training.md)")  # fmt: skip
    a("--ema-rate", help="comma list of EMA rates (default 0.9999; classifier: none)")
    a("--timestep-sampler", choices=["uniform", "loss-second-moment"])
    a("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
      help="torch.amp precision (auto: bf16 on CUDA, fp32 on CPU)")  # fmt: skip
    a("--grad-clip", type=float, help="clip the global gradient norm to this value")
    a("--labels", choices=["filename", "folder"], default="filename",
      help="class from the text before the first '_' of the file name (the original's rule) "
      "or from the top-level sub-folder")  # fmt: skip
    a("--classes-from", metavar="FILE",
      help="the class -> index map: a run's classes.json or a file with one class name per "
      "line in index order (e.g. the 1000 ImageNet WNIDs, to fine-tune on a subset)")  # fmt: skip
    a("--fit-classes", action="store_true",
      help="resize the label embedding / classifier head to the data's classes")  # fmt: skip
    a("--random-crop", action=argparse.BooleanOptionalAction, default=kind == "classifier",
      help="the original's random crop (classifiers' default), not the centre crop")  # fmt: skip
    a("--flip", action=argparse.BooleanOptionalAction, default=True, help="random h-flip")
    a("--skip-bad-images", action="store_true", help="count and skip unreadable images")
    a("--seed", type=int, default=0)
    a("--log-interval", type=int, help="steps between log rows (default 10)")
    a("--save-interval", type=int, help="steps between checkpoints (default 1000)")
    a("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    a("--max-nonfinite", type=int, default=5, help="stop after N non-finite losses in a row")
    a("--workers", type=int, default=0, help="data-loading processes per rank")
    a("--device", help="cpu, cuda, cuda:1 (default: CUDA if present)")
    a("--no-progress", action="store_true")
    a("--compile", action="store_true", help=checks.COMPILE_HELP)
    a("--checkpoint-attention", action="store_true",
      help="recompute the attention blocks in backward (as the original does): less memory, "
      "a little more time (docs/speed.md)")  # fmt: skip
    a("--dry-run", action="store_true", help="print the resolved configuration and exit")
    a(
        "--force",
        action="store_true",
        help="resume a run in --out although its data, batch "
        "size, seed or other recipe settings differ (each difference is noted in config.json)",
    )
    if kind == "classifier":
        a("--val-data", help="held-out images (default: hold out --val-fraction of --data)")
        a("--val-fraction", type=float, default=0.1)
        a("--eval-interval", type=int, help="steps between held-out evaluations (default 100)")
        a("--eval-size", type=int, default=512, help="held-out images per evaluation")
        a("--no-noise", action="store_true", help="train on clean images (original noised=False)")
    else:
        a("--label-dropout", type=float, default=0.0,
          help="classifier-free guidance: probability of replacing a label by the null label "
          "(the network's last class index)")  # fmt: skip
        a("--sample-interval", type=int, default=0, help="EMA sample grid every N steps")
        a("--sample-steps", default="ddim25", help="respacing of the sample grid's DDIM run")
        a("--num-samples", type=int, default=16, help="images in the sample grid")


def _split_original(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """(the original scripts' own flags, the model/diffusion flags) of a pasted flag line."""
    from adm.models.flags import flag_pairs

    try:
        pairs = flag_pairs(tokens)
    except ValueError as err:
        raise UserError(str(err)) from None
    script = {k: v for k, v in pairs if k in _SCRIPT_FLAGS}
    model = [t for k, v in pairs if k not in _SCRIPT_FLAGS for t in (f"--{k}", v)]
    return script, model


def _truthy(text: str) -> bool:
    return text.lower() in ("yes", "true", "t", "y", "1")


def _apply_script_flags(args: argparse.Namespace, f: dict[str, str], notes: list[str]) -> None:
    """Fill options not given the adm way from the original's flags (adm's options win)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))

    def fill(name: str, value: object) -> None:
        if getattr(args, name, None) is None:
            setattr(args, name, value)

    def number(key: str, value: str, kind: type = int):
        try:
            return kind(value)
        except ValueError:
            raise UserError(f"--{key} {value!r}: expected a number") from None

    for key, value in f.items():
        if key in ("data_dir", "val_data_dir"):
            fill("data" if key == "data_dir" else "val_data", value)
        elif key in ("lr", "weight_decay"):
            fill(key, number(key, value, float))
        elif key == "schedule_sampler":
            fill("timestep_sampler", value)
        elif key in ("lr_anneal_steps", "iterations"):
            if number(key, value) > 0:
                fill("steps", int(value))
                if key == "lr_anneal_steps":
                    fill("anneal_lr", True)
        elif key == "anneal_lr":
            fill("anneal_lr", _truthy(value))
        elif key == "batch_size":  # per rank in the original
            fill("batch_size", number(key, value) * world)
        elif key == "microbatch":
            fill("microbatch", int(value) if number(key, value) > 0 else None)
        elif key == "ema_rate":
            fill("ema_rate", value)
        elif key in ("log_interval", "save_interval", "eval_interval"):
            fill(key, number(key, value))
        elif key in ("use_fp16", "classifier_use_fp16"):
            if _truthy(value) and args.precision == "auto":
                args.precision = "fp16"
        elif key == "resume_checkpoint" and value:
            fill("init_from", value)
            notes.append(
                "--resume_checkpoint loads weights only; rerun in the same --out to resume"
            )
        elif key == "noised" and not _truthy(value):
            args.no_noise = True
        elif key == "fp16_scale_growth":
            notes.append("--fp16_scale_growth ignored: torch.amp.GradScaler manages the scale")


def _check_options(args: argparse.Namespace) -> None:
    """Counts and intervals (given the adm way or by the original's flags), before any work."""
    checks.at_least(args, {
        "steps": 1, "batch_size": 1, "log_interval": 1, "save_interval": 1, "eval_interval": 1,
        "keep": 1, "max_nonfinite": 1, "workers": 0, "eval_size": 1, "num_samples": 1,
        "sample_interval": 0, "seed": 0,
    })  # fmt: skip
    if args.microbatch is not None and args.microbatch != -1 and args.microbatch < 1:
        raise UserError(f"--microbatch must be at least 1 (or -1: all), got {args.microbatch}")


def _preset_from_flags(kind: str, tokens: list[str]):
    """A preset from the original's model flags alone (its defaults for everything else)."""
    from adm.models import flags
    from adm.models.presets import Preset, SamplingSettings

    parsed = flags.parse_flag_line(tokens)
    diffusion = flags.diffusion_from_flags(parsed)
    small = None
    if kind == "classifier":
        network = flags.classifier_from_flags(parsed)
    elif kind == "superres":
        network, small = flags.superres_from_flags(parsed)
    else:
        network = flags.unet_from_flags(parsed)
    sampling = SamplingSettings(steps=str(diffusion.steps))
    return Preset("custom", kind, network, diffusion, small_size=small, sampling=sampling)


def _resolve_preset(args: argparse.Namespace, kind: str, model_tokens: list[str]):
    """(preset, class names of the checkpoint's run or None)."""
    from adm.models import checkpoint, presets
    from adm.models.overrides import apply_overrides
    from adm.training.loop import load_class_map

    overrides = [*([" ".join(model_tokens)] if model_tokens else []), *args.set]
    classes = None
    if args.init_from:
        path = checkpoint.resolve_checkpoint(args.init_from)
        base = (presets.get_preset(args.preset) if args.preset else None) or checkpoint.read_preset(
            path
        )
        if base is None:
            base = checkpoint.detect_preset(checkpoint.load_state_dict(path), hint=path.stem)
        found = load_class_map(path)
        classes = tuple(found["class_names"]) if found and found["class_names"] else None
    elif args.preset:
        base = presets.get_preset(args.preset)
    elif model_tokens:
        return apply_overrides(_preset_from_flags(kind, model_tokens), args.set), None
    else:
        raise UserError("pass --preset NAME, --init-from CHECKPOINT or the original's model flags")
    if base.kind != kind:
        command = {v: k for k, v in KINDS.items()}[base.kind]
        raise UserError(f"{base.name} is a {base.kind} preset: use `adm {command}`")
    return (apply_overrides(base, overrides) if overrides else base), classes


def _cmd_train(args: argparse.Namespace) -> int:
    from adm.data import datasets as datalib
    from adm.training import loop as trainlib

    kind, notes = args.train_kind, []
    script_flags, model_tokens = _split_original(list(args.original_flags))
    _apply_script_flags(args, script_flags, notes)
    if not args.data:
        raise UserError("pass --data (an image folder, .npz or IDX folder)")
    if args.steps is None:
        raise UserError("pass --steps (or the original's --lr_anneal_steps / --iterations)")
    _check_options(args)
    checks.writable_dir(args.out, "run folder")
    try:
        preset, classes = _resolve_preset(args, kind, model_tokens)
        if args.classes_from:
            classes = _read_class_names(args.classes_from)
        config = _train_config(args, kind)
        spec = trainlib.DataSpec(
            args.data, labels=args.labels, val_path=getattr(args, "val_data", None),
            val_fraction=getattr(args, "val_fraction", 0.1), fit_classes=args.fit_classes,
        )  # fmt: skip
        setup = trainlib.prepare(
            preset, spec, args.out, config, init_from=args.init_from, init_classes=classes
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(os_error_text(err)) from None
    setup.notes += notes
    setup.force_resume = args.force
    if args.dry_run:
        print(json.dumps(setup.describe(), indent=2, default=str))
        return 0
    if os.environ.get("RANK", "0") == "0":
        for note in setup.notes:
            print(f"adm {args.command}: {note}", file=sys.stderr)
    try:
        summary = trainlib.train(setup)
    except (datalib.DataError, trainlib.TrainingError) as err:
        print(f"adm {args.command}: error: {err}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in summary.items() if "_q" not in k}, indent=2))
    return 0


def _read_class_names(path: str) -> tuple[str, ...]:
    """Class names in index order from a classes.json of a run or a one-name-per-line file."""
    from pathlib import Path

    text = Path(path).read_text()
    if path.endswith(".json"):
        names = json.loads(text)
        names = names["class_names"] if isinstance(names, dict) else names
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(names)) != len(names) or not names:
        raise UserError(f"{path}: expected distinct class names")
    return tuple(str(n) for n in names)


def _train_config(args: argparse.Namespace, kind: str):
    from adm.training.loop import TrainConfig

    classifier = kind == "classifier"
    if args.ema_rate is None:
        rates = () if classifier else (0.9999,)
    else:
        try:
            rates = tuple(float(r) for r in str(args.ema_rate).split(",") if r.strip())
            if not rates and str(args.ema_rate).strip():  # "," is a typo, not "no EMA"
                raise ValueError
        except ValueError:
            message = f"--ema-rate {args.ema_rate!r}: expected rates like 0.9999,0.999"
            raise UserError(message) from None
    values = dict(
        steps=args.steps,
        batch_size=8 if args.batch_size is None else args.batch_size,
        microbatch=args.microbatch if args.microbatch and args.microbatch > 0 else None,
        lr=args.lr if args.lr is not None else (3e-4 if classifier else 1e-4),
        weight_decay=args.weight_decay or 0.0,
        anneal_lr=bool(args.anneal_lr),
        ema_rates=rates,
        timestep_sampler=args.timestep_sampler or "uniform",
        precision=args.precision,
        grad_clip=args.grad_clip,
        random_crop=args.random_crop,
        random_flip=args.flip,
        max_nonfinite=args.max_nonfinite,
        seed=args.seed,
        log_interval=args.log_interval or 10,
        save_interval=args.save_interval or 1000,
        keep=args.keep,
        workers=args.workers,
        skip_bad_images=args.skip_bad_images,
        device=args.device,
        progress=not args.no_progress,
        compile=args.compile,
        checkpoint_attention=args.checkpoint_attention,
    )
    if classifier:
        values.update(noised=not args.no_noise, eval_interval=args.eval_interval or 100,
                      eval_size=args.eval_size)  # fmt: skip
    else:
        values.update(label_dropout=args.label_dropout, sample_interval=args.sample_interval,
                      sample_steps=args.sample_steps, num_samples=args.num_samples)  # fmt: skip
    if values["batch_size"] % int(os.environ.get("WORLD_SIZE", "1")):
        raise UserError("--batch-size (global) must be divisible by the number of processes")
    return dataclasses.replace(TrainConfig(steps=1), **values)
