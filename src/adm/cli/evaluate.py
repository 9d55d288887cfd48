"""`adm eval` and `adm stats`: options -> checked inputs -> `adm.evaluation.evaluate`.

Every check (inputs, metric names, what each metric needs, output paths, weights) runs before an
image is decoded, and each failure is one line (exit 2). No torch import until a command runs.
"""

from __future__ import annotations

import argparse
import sys

from adm._util.atomic import atomic_path
from adm._util.errors import UserError
from adm.cli import checks

LABELS = {
    "inception_score": "Inception Score",
    "inception_score_std": "Inception Score std",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
    "kid": "KID",
    "kid_std": "KID std",
    "fd_dinov2": "FD-DINOv2",
}
LINES = {
    "is": ("inception_score", "inception_score_std"),
    "fid": ("fid",),
    "sfid": ("sfid",),
    "pr": ("precision", "recall"),
    "kid": ("kid", "kid_std"),
    "fd_dinov2": ("fd_dinov2",),
}


def add_commands(sub: argparse._SubParsersAction) -> None:
    _add_eval_command(sub)
    _add_stats_command(sub)


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="IS, FID, sFID, precision, recall (the paper's), KID, FD-DINOv2 of samples",
        description=(
            "The evaluator of openai/guided-diffusion in PyTorch, plus KID and FD-DINOv2. REF and "
            "SAMPLE are each: an .npz batch (arr_0 = uint8 images [N, H, W, 3]; grey [N, H, W, 1] "
            "or [N, H, W] read as RGB); a folder of images (searched recursively: PNG, JPEG, "
            "WebP, ...); a quoted glob ('samples/*.png'); or a statistics .npz (adm's reference "
            "batch, or pytorch-fid's mu/sigma file: enough for FID). Example: adm eval "
            "VIRTUAL_imagenet256_labeled.npz samples_50000x256x256x3.npz --json scores.json"
        ),
    )
    p.add_argument("ref", help="reference: .npz batch or statistics, image folder, or glob")
    p.add_argument("sample", help="samples: .npz batch, image folder, glob (or statistics)")
    p.add_argument(
        "--metrics",
        default="is,fid,sfid,pr",
        help="comma-separated subset of is,fid,sfid,pr,kid,fd_dinov2 (default: the paper's "
        "is,fid,sfid,pr = IS, FID, sFID, precision, recall); only the features they need are "
        "computed",
    )
    _add_network_options(p)
    p.add_argument(
        "--dinov2-weights",
        metavar="PATH",
        help="dinov2_vitl14_pretrain.pth for fd_dinov2 (default: searched in $ADM_CACHE_DIR, "
        "~/.cache/adm and torch hub's checkpoints folder)",
    )
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="neither read nor write the feature cache next to each .npz batch",
    )
    p.add_argument(
        "--pr-mode",
        choices=("original", "exact"),
        default="original",
        help="precision/recall distances: float16 as the original (default) or float64",
    )
    p.add_argument("--kid-subsets", type=int, default=100, help="KID subsets (default 100)")
    p.add_argument(
        "--kid-subset-size",
        type=int,
        default=1000,
        help="rows per KID subset (default 1000, as torch-fidelity; clamped to the smaller set)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_eval)


def _add_stats_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stats",
        help="build a reference batch (mu, sigma, mu_s, sigma_s + arr_0) from images or an npz",
        description=(
            "Statistics of a custom dataset for `adm eval`: SOURCE is a folder of images "
            "(searched recursively; other sizes resized to the first's, with a note), a quoted "
            "glob, or an .npz batch. Writes mu/sigma/mu_s/sigma_s over all images and arr_0 = a "
            "random subset of --num-images of them for precision/recall."
        ),
    )
    p.add_argument("source", help="image folder, glob or .npz batch")
    p.add_argument("out", help="output reference batch .npz")
    p.add_argument(
        "--num-images",
        type=int,
        default=10000,
        help="images kept in arr_0 (default 10000, as in the released batches)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the arr_0 subset")
    _add_network_options(p)
    p.add_argument(
        "--dinov2",
        action="store_true",
        help="also write mu_dinov2, sigma_dinov2 (FD-DINOv2 against whole-dataset statistics)",
    )
    p.add_argument("--dinov2-weights", metavar="PATH", help="as for adm eval (implies --dinov2)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_stats)


def _add_network_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--inception-weights",
        metavar="PATH",
        help="pt_inception-2015-12-05-6726825d.pth (default: searched in $ADM_CACHE_DIR, "
        "~/.cache/adm and torch hub's checkpoints folder, else downloaded)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    p.add_argument(
        "--memory-format",
        choices=("auto", "channels_last", "contiguous"),
        default="auto",
        help="Inception's memory format: auto = channels_last on the CPU (measured 1.28x faster "
        "here), contiguous on CUDA (not measured); features agree to float32 roundoff",
    )


def _device(args: argparse.Namespace):
    import torch

    from adm.evaluation import features

    try:
        device = torch.device(args.device) if args.device else features.default_device()
    except RuntimeError as err:
        raise UserError(f"--device {args.device}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available")
    return device


def _weights(args: argparse.Namespace, need_inception: bool, need_dinov2: bool):
    """Paths of the weights the run needs, found (or downloaded) before torch is imported: an
    offline machine hears what to do within seconds."""
    from adm.evaluation import weights

    try:
        inc = weights.resolve(weights.INCEPTION, args.inception_weights) if need_inception else None
        dino = weights.resolve(weights.DINOV2, args.dinov2_weights) if need_dinov2 else None
    except weights.WeightsError as err:
        raise UserError(str(err)) from err
    return inc, dino


def _inception(args: argparse.Namespace, path, device):
    from adm.evaluation import inception

    try:
        model = inception.load_inception(path, device)
        fmt = args.memory_format
        model.use_channels_last(fmt == "channels_last" or (fmt == "auto" and device.type == "cpu"))
    except inception.WeightsError as err:
        raise UserError(str(err)) from err
    if model.weights_id != inception.WEIGHTS_SHA256:
        _note(
            f"{path} is not {inception.WEIGHTS_FILENAME} (SHA-256 differs): numbers are not "
            "comparable with published ones"
        )
    return model


def _dinov2(path, device):
    from adm.evaluation import dinov2

    try:
        model = dinov2.load_dinov2(path, device)
    except dinov2.WeightsError as err:
        raise UserError(str(err)) from err
    _note(f"DINOv2 weights {path}: SHA-256 {model.weights_id} (no published value to compare "
          "with; keys and shapes loaded strictly)")  # fmt: skip
    return model


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr)


def _notes(*sources) -> None:
    """One line per conversion applied to an input (grey batches, resized / grey / RGBA files)."""
    for src in sources:
        if src is None:
            continue
        if src.is_grey:
            _note(f"{src.path} holds grey images {src.layout}; the channel is replicated to RGB "
                  "for Inception")  # fmt: skip
        for text in src.notes:
            _note(text)


def _check_counts(args: argparse.Namespace) -> None:
    checks.at_least(args, {"batch_size": 1, "kid_subsets": 1, "kid_subset_size": 2})


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from adm.evaluation import batches, inputs

    _check_counts(args)
    try:
        metrics = inputs.parse_metrics(args.metrics)
        ref, sample = inputs.open_input(args.ref), inputs.open_input(args.sample)
        inputs.check_requirements(metrics, ref, sample)
        if args.json:
            batches.check_output_path(args.json)
        inc_path, dino_path = _weights(args, *inputs.networks_needed(metrics, ref, sample))
        device = _device(args)
        from adm.evaluation import evaluate

        model = _inception(args, inc_path, device) if inc_path else None
        dino = _dinov2(dino_path, device) if dino_path else None
        _notes(ref.images, sample.images)  # after every check: an error stays one line
        settings = evaluate.Settings(
            batch_size=args.batch_size, use_cache=not args.no_cache, distance_mode=args.pr_mode,
            kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
            progress=not args.no_progress,
        )  # fmt: skip
        result = evaluate.evaluate_inputs(ref, sample, metrics, model, dino, settings)
    except batches.BatchError as err:
        raise UserError(str(err)) from err
    for side, used in result.stats_from_file.items():
        spec = args.ref if side == "ref" else args.sample
        _note(f"{spec}: {', '.join(used)} from the statistics stored in the file")
    if result.kid_subset_size is not None and result.kid_subset_size < args.kid_subset_size:
        _note(f"KID subsets of {result.kid_subset_size} rows (the smaller set's size), not "
              f"{args.kid_subset_size}")  # fmt: skip
    record = dataclasses.asdict(result)
    for metric in metrics:
        for key in LINES[metric]:
            print(f"{LABELS[key]}: {record[key]}")
    if args.json:
        record.update(
            ref_batch=str(args.ref),
            sample_batch=str(args.sample),
            pr_mode=args.pr_mode,
            inception_weights_sha256=model.weights_id if model is not None else None,
            dinov2_weights_sha256=getattr(dino, "weights_id", None),
        )
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from adm.evaluation import batches, evaluate

    if args.num_images < 0:
        raise UserError(f"--num-images must be >= 0, got {args.num_images}")
    checks.at_least(args, {"seed": 0, "batch_size": 1})
    try:
        source = batches.open_source(args.source)
        out = batches.check_output_path(args.out)
        inc_path, dino_path = _weights(args, True, args.dinov2 or bool(args.dinov2_weights))
        device = _device(args)
        model = _inception(args, inc_path, device)
        dino = _dinov2(dino_path, device) if dino_path else None
        _notes(source)
        evaluate.build_reference_batch(
            source, out, model, num_images=args.num_images, seed=args.seed,
            batch_size=args.batch_size, progress=not args.no_progress, dinov2=dino,
        )  # fmt: skip
    except batches.BatchError as err:
        raise UserError(str(err)) from err
    kept = min(args.num_images, source.n)
    print(f"wrote {out}: statistics of {source.n} images, {kept} of them in arr_0")
    return 0
