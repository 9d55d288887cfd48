"""`adm <command>`: parse arguments, resolve configs, make one library call.

The only module that sees argparse. Each command is a `_cmd_<name>(args)` function registered in
`_build_parser`; library code never receives an `argparse.Namespace`. Building the parser imports
no torch or numpy (the commands import them), so `adm --help` and `adm CMD --help` answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from adm import __version__
from adm._util.errors import UserError, os_error_text
from adm.cli import checks
from adm.cli import edit as cli_edit
from adm.cli import evaluate as cli_evaluate
from adm.cli import models as cli_models
from adm.cli import sample as cli_sample
from adm.cli import sweep as cli_sweep


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: "adm sample: error: argument --num-samples: invalid int
    value: 'abc' (adm sample --help lists the options)" instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="adm",
        description="Diffusion Models Beat GANs (ADM): sample, train and evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"adm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_command(sub)
    _add_flags_command(sub)
    cli_models.add_commands(sub)
    cli_sample.add_commands(sub)
    cli_edit.add_commands(sub)
    cli_sweep.add_commands(sub)
    cli_evaluate.add_commands(sub)
    _add_train_command(sub)
    return parser


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the paper in miniature on a CPU: classifier guidance on Fashion-MNIST",
        description=(
            "Steer the bundled unconditional Fashion-MNIST diffusion model towards requested "
            "classes with the bundled noisy classifier (DDIM-25 at scales 0, 1, 2, 4, 8 and "
            "DPM-Solver++ at 10 steps), score the samples with an independent judge classifier "
            "(accuracy, FID, precision, recall in its feature space) and write grids, a plot, "
            "report.md and metrics.json. About 2 minutes on 2 CPU cores."
        ),
    )
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "--per-class", type=int, default=10, help="samples per class and scale (default 10)"
    )
    p.add_argument("--data", help="folder with the Fashion-MNIST IDX files (else searched)")
    p.add_argument("--weights", help="folder with the three demo .safetensors (default: bundled)")
    p.add_argument("--retrain", action="store_true", help="train all three models first "
                   "(resumable: rerun to continue; about 3 h on a 2-core CPU)")  # fmt: skip
    p.add_argument("--work-dir", default="runs/demo-train", help="--retrain's run folders")
    p.add_argument("--retrain-jobs", type=int, default=2, choices=(1, 2),
                   help="--retrain: 2 runs the diffusion and classifier stages side by side, one "
                   "thread each (default 2); 1 runs them one after the other")  # fmt: skip
    p.add_argument("--device", default="cpu")
    p.add_argument("--eta", type=float, help="DDIM's eta for the scale sweep: 0 deterministic, "
                   "1 fresh noise at every step (default 1)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--edit", action="store_true", help="the editing demo instead: inpainting "
                   "(replacement, DPM-Solver++, RePaint) and SDEdit sneaker -> sandal on 16 "
                   "images, about a minute (docs/editing.md)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo, run_folder="out")


def _cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    if args.per_class < 2:
        raise UserError("--per-class must be at least 2")
    checks.at_least(args, {"seed": 0})
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise UserError(f"--eta must be between 0 and 1, got {args.eta:g}")
    checks.writable_dir(args.out)
    if args.edit:
        return _cmd_demo_edit(args)
    if args.retrain:
        checks.writable_dir(args.work_dir, "work folder")
    # A first line at once: importing torch and loading take seconds before the progress bar.
    print(
        f"adm demo: classifier guidance on Fashion-MNIST, {10 * args.per_class} samples at each of "
        f"5 guidance scales (+ DPM-Solver++); loading torch, the bundled models and the data ...",
        flush=True,
    )

    import torch

    from adm.cli import demo
    from adm.data.datasets import DataError

    settings = demo.DemoSettings(per_class=args.per_class, seed=args.seed)
    if args.eta is not None:
        settings = dataclasses.replace(settings, eta=args.eta)
    try:
        weights = Path(args.weights) if args.weights else demo.WEIGHTS_DIR
        if args.retrain:
            weights = demo.retrain(
                Path(args.work_dir), args.data, not args.no_progress, jobs=args.retrain_jobs
            )
        result = demo.run_demo(
            Path(args.out), settings, weights_dir=weights, data_dir=args.data,
            device=torch.device(args.device), progress=not args.no_progress,
        )  # fmt: skip
    except (DataError, ValueError) as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(os_error_text(err)) from None
    print(demo.table(result))
    print(f"\njudge test accuracy {result['judge_test_accuracy']:.1%}; {result['seconds']} s; "
          f"report: {Path(args.out) / 'report.md'}")  # fmt: skip
    return 0


def _cmd_demo_edit(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.retrain or args.eta is not None or args.per_class != 10:
        raise UserError("adm demo --edit takes --out, --data, --weights, --device and --seed")
    print("adm demo --edit: inpainting and SDEdit on Fashion-MNIST, 16 images each; loading "
          "torch, the bundled models and the data ...", flush=True)  # fmt: skip

    import torch

    from adm.cli import demo, demo_edit
    from adm.data.datasets import DataError

    settings = demo_edit.EditDemoSettings(seed=args.seed)
    try:
        result = demo_edit.run_edit_demo(
            Path(args.out), settings, weights_dir=Path(args.weights or demo.WEIGHTS_DIR),
            data_dir=args.data, device=torch.device(args.device),
            log=(lambda _: None) if args.no_progress else print,
        )  # fmt: skip
    except (DataError, ValueError) as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(os_error_text(err)) from None
    print(demo_edit.table(result))
    print(f"\n{result['seconds']} s; report: {Path(args.out) / 'edit_report.md'}")
    return 0


def _add_flags_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flags",
        help="translate the original's flag line into adm's typed configs and print them",
        description=(
            "Paste a flag line of openai/guided-diffusion (e.g. MODEL_FLAGS + DIFFUSION_FLAGS) and "
            "see the network and diffusion configs adm resolves from it, e.g. "
            "`adm flags --image_size 256 --num_channels 256 --attention_resolutions 32,16,8`."
        ),
    )
    p.set_defaults(func=_cmd_flags, accepts_original_flags=True)


def _cmd_flags(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from adm.models import flags

    try:
        parsed = flags.parse_flag_line(args.original_flags)
        model_cfg, diffusion_cfg = flags.model_and_diffusion_from_flags(parsed)
    except ValueError as err:
        raise UserError(str(err)) from err
    print(
        json.dumps(
            {
                "model": {"class": type(model_cfg).__name__, **dataclasses.asdict(model_cfg)},
                "diffusion": dataclasses.asdict(diffusion_cfg),
            },
            indent=2,
        )
    )
    return 0


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    """`adm train`, `adm train-classifier`, `adm train-superres` (options in `adm.cli.train`)."""
    from adm.cli import train as cli_train

    cli_train.add_commands(sub)


def _lock_run_folder(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """Commands that write a run folder (`set_defaults(run_folder="out")`) hold its lock while
    they run (`adm._util.lock`); a second process gets one line naming the holder. Under
    torchrun only rank 0 locks; a dry run writes nothing and locks nothing."""
    dest = getattr(args, "run_folder", None)
    if dest is None or os.environ.get("RANK", "0") != "0" or getattr(args, "dry_run", False):
        return
    from adm._util.lock import FolderBusyError, run_folder_lock

    folder = getattr(args, dest)
    checks.writable_dir(folder, "run folder" if hasattr(args, "train_kind") else "output folder")
    try:
        stack.enter_context(run_folder_lock(folder, f"adm {args.command}"))
    except FolderBusyError as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(f"cannot use output folder {folder}: {os_error_text(err)}") from None


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    # Commands that accept the original's flag lines verbatim get the unparsed rest.
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "accepts_original_flags", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.original_flags = rest
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    from adm._util.signals import Interrupted, stop_on_signals

    try:
        with contextlib.ExitStack() as stack:
            _lock_run_folder(args, stack)
            if getattr(args, "stops_cleanly", False):  # loops that stop at a boundary on a signal
                stack.enter_context(stop_on_signals())
            code = int(args.func(args) or 0)
            sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except UserError as err:
        print(f"adm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"adm {args.command}: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a loop that stops cleanly: no traceback
        print(f"\nadm {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `adm presets | head`: the reader left early; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
