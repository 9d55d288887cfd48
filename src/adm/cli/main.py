"""`adm <command>`: parse arguments, resolve configs, make one library call.

The only module that sees argparse. Each command is a `_cmd_<name>(args)` function registered in
`_build_parser`; library code never receives an `argparse.Namespace`. Building the parser imports
no torch or numpy (the commands import them), so `adm --help` and `adm CMD --help` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from adm import __version__
from adm._util.atomic import atomic_path
from adm._util.errors import UserError, os_error_text
from adm.cli import checks
from adm.cli import edit as cli_edit
from adm.cli import models as cli_models
from adm.cli import sample as cli_sample
from adm.cli import sweep as cli_sweep


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    _add_eval_command(sub)
    _add_stats_command(sub)
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
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    if args.per_class < 2:
        raise UserError("--per-class must be at least 2")
    checks.at_least(args, {"seed": 0})
    if args.eta is not None and not 0 <= args.eta <= 1:
        raise UserError(f"--eta must be between 0 and 1, got {args.eta:g}")
    checks.writable_dir(args.out)
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


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="Inception Score, FID, sFID, precision and recall of a sample batch (the paper's)",
        description=(
            "The evaluator of openai/guided-diffusion in PyTorch. REF_BATCH and SAMPLE_BATCH are "
            ".npz files with arr_0 = uint8 images [N, H, W, 3] (grey [N, H, W, 1] or [N, H, W] "
            "are read as RGB, the channel replicated); a reference batch may also store "
            "mu, sigma, mu_s, sigma_s (then FID/sFID use them). Example: adm eval "
            "VIRTUAL_imagenet256_labeled.npz samples_50000x256x256x3.npz --json scores.json"
        ),
    )
    p.add_argument("ref_batch", help="reference batch .npz")
    p.add_argument("sample_batch", help="sample batch .npz")
    _add_inception_options(p)
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the feature cache next to each batch",
    )
    p.add_argument(
        "--pr-mode",
        choices=("original", "exact"),
        default="original",
        help="precision/recall distances: float16 as the original (default) or float64",
    )
    p.set_defaults(func=_cmd_eval)


def _add_stats_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="build a reference batch (mu, sigma, mu_s, sigma_s + arr_0) from images or an npz",
        description=(
            "Statistics of a custom dataset for `adm eval`: SOURCE is a folder of same-sized "
            "images (searched recursively) or an .npz batch. Writes mu/sigma/mu_s/sigma_s over "
            "all images and arr_0 = a random subset of --num-images of them for precision/recall."
        ),
    )
    p.add_argument("source", help="image folder or .npz batch")
    p.add_argument("out", help="output reference batch .npz")
    p.add_argument(
        "--num-images",
        type=int,
        default=10000,
        help="images kept in arr_0 (default 10000, as in the released batches)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the arr_0 subset")
    _add_inception_options(p)
    p.set_defaults(func=_cmd_stats)


def _add_inception_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="pt_inception-2015-12-05-6726825d.pth (default: $ADM_CACHE_DIR or "
        "~/.cache/adm, downloaded if missing)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")


def _inception_from_args(args: argparse.Namespace):
    import torch

    from adm.evaluation import evaluate, inception

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    try:
        device = torch.device(args.device) if args.device else evaluate.default_device()
    except RuntimeError as err:
        raise UserError(f"--device {args.device}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available")
    try:
        weights = inception.resolve_weights(args.inception_weights)
        model = inception.load_inception(weights, device)
    except inception.WeightsError as err:
        raise UserError(str(err)) from err
    if model.weights_id != inception.WEIGHTS_SHA256:
        print(
            f"note: {weights} is not {inception.WEIGHTS_FILENAME} (SHA-256 differs): numbers are "
            "not comparable with published ones",
            file=sys.stderr,
        )
    return model


def _note_grey(*sources) -> None:
    """One line per grey npz batch: it is read as RGB with the channel replicated."""
    for src in sources:
        if src.is_grey:
            print(
                f"note: {src.path} holds grey images {src.layout}; the channel is replicated to "
                "RGB for Inception",
                file=sys.stderr,
            )


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from adm.evaluation import batches, evaluate

    try:
        ref, sample, _ = evaluate.check_eval_inputs(args.ref_batch, args.sample_batch)
        if args.json:
            batches.check_output_path(args.json)
        model = _inception_from_args(args)
        _note_grey(ref, sample)  # after every check: an error stays one line
        result = evaluate.evaluate(
            args.ref_batch,
            args.sample_batch,
            model,
            batch_size=args.batch_size,
            use_cache=not args.no_cache,
            distance_mode=args.pr_mode,
        )
    except batches.BatchError as err:
        raise UserError(str(err)) from err
    print(f"Inception Score: {result.inception_score}")
    print(f"FID: {result.fid}")
    print(f"sFID: {result.sfid}")
    print(f"Precision: {result.precision}")
    print(f"Recall: {result.recall}")
    if args.json:
        record = {
            **dataclasses.asdict(result),
            "ref_batch": str(args.ref_batch),
            "sample_batch": str(args.sample_batch),
            "pr_mode": args.pr_mode,
            "inception_weights_sha256": model.weights_id,
        }
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from adm.evaluation import batches, evaluate

    if args.num_images < 0:
        raise UserError(f"--num-images must be >= 0, got {args.num_images}")
    checks.at_least(args, {"seed": 0})
    try:
        source = batches.open_source(args.source)
        out = batches.check_output_path(args.out)
        model = _inception_from_args(args)
        _note_grey(source)
        evaluate.build_reference_batch(
            source,
            out,
            model,
            num_images=args.num_images,
            seed=args.seed,
            batch_size=args.batch_size,
        )
    except batches.BatchError as err:
        raise UserError(str(err)) from err
    kept = min(args.num_images, source.n)
    print(f"wrote {out}: statistics of {source.n} images, {kept} of them in arr_0")
    return 0


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    """`adm train`, `adm train-classifier`, `adm train-superres` (options in `adm.cli.train`)."""
    from adm.cli import train as cli_train

    cli_train.add_commands(sub)


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
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except UserError as err:
        print(f"adm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `adm presets | head`: the reader left early; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
