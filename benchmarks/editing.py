"""Editing on the bundled Fashion-MNIST models (docs/editing.md): RePaint vs replacement, SDEdit.

Runs the real `adm inpaint` / `adm edit` commands (printed as they run) on Fashion-MNIST test
images and scores the outputs with the demo's judge (`fmnist_judge`):

* inpainting, right half masked: judge accuracy on the true class, the masked region's error
  against the original, and the seam (mean |difference| of neighbouring pixels across the mask
  boundary, next to the same measure on the originals), for RePaint (r, j) and replacement, each
  unguided and guided towards the true class;
* SDEdit from one class towards another at several strengths: the judge's accuracy on the
  target class against the pixel distance to the input.

    python benchmarks/editing.py --out runs/editing-bench [--num 100] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from adm.cli import main as cli
from adm.data import fashion_mnist
from adm.evaluation.edits import masked_error, seam
from adm.evaluation.judge import Judge
from adm.models import checkpoint

CLASSES = ("T-shirt", "trouser", "pullover", "dress", "coat",
           "sandal", "shirt", "sneaker", "bag", "ankle boot")  # fmt: skip


def run(argv: list[str], log: list[str]) -> float:
    line = "adm " + " ".join(argv)
    print(line, flush=True)
    log.append(line)
    start = time.perf_counter()
    if cli.main(argv) != 0:
        raise SystemExit(f"failed: {line}")
    return round(time.perf_counter() - start, 1)


def inpainting(args, judge: Judge, images, labels, out: Path, log: list[str]) -> list[dict]:
    keep = np.zeros((28, 28), bool)
    keep[:, :14] = True  # right half masked
    np.savez(out / "inputs.npz", images, labels)
    np.savez(out / "right_half.npz", np.where(keep, 255, 0).astype(np.uint8)[None])
    rows = []
    from adm.diffusion.inpaint import network_calls

    methods = [("RePaint", args.resample, args.steps, []), ("replacement", 1, args.steps, [])]
    methods = [m for m in methods if m[0] in args.methods]
    if args.equal_nfe:  # replacement given as many network calls as RePaint, in more steps
        calls = network_calls(args.steps, args.jump, args.resample)
        methods = [("replacement-equal-NFE", 1, calls, [])]
    if args.solvers:  # replacement with fast solvers (sampler:steps) next to DDPM replacement
        methods = [("replacement", 1, args.steps, [])]
        for solver in args.solvers:
            sampler, steps = solver.split(":")
            methods.append((f"replacement-{sampler}-{args.grid}{steps}", 1, int(steps),
                            ["--sampler", sampler, "--grid", args.grid]))  # fmt: skip
    for name, r, steps, extra in methods:
        for scale in args.inpaint_scales or (0.0, args.scale):
            folder = out / f"inpaint_{name}_s{scale:g}{_seed_tag(args)}"
            argv = ["inpaint", "--checkpoint", "fmnist_diffusion", "--images",
                    str(out / "inputs.npz"), "--masks", str(out / "right_half.npz"),
                    "--steps", str(steps), "--jump", str(args.jump), "--resample", str(r),
                    "--batch-size", "50", "--out", str(folder), "--no-progress",
                    "--seed", str(args.seed), *extra]  # fmt: skip
            if scale:
                argv += ["--classifier", "fmnist_classifier", "--classifier-scale", f"{scale:g}",
                         "--classes", "labels"]  # fmt: skip
            seconds = run(argv, log)
            edits = np.load(folder / f"edits_{len(images)}x28x28x1.npz")["arr_0"][..., 0]
            logits, _ = judge(edits)
            rows.append({
                "method": name, "resample": r, "jump": args.jump, "scale": scale, "steps": steps,
                "nfe": network_calls(steps, args.jump, r),
                "judge_accuracy": float((logits.argmax(1).numpy() == labels).mean()),
                "masked_mae": masked_error(edits, images, keep)[0],
                "masked_rmse": masked_error(edits, images, keep)[1],
                "seam": seam(edits, keep), "seam_originals": seam(images, keep),
                "known_exact": bool((edits[:, keep] == images[:, keep]).all()),
                "seconds": seconds, "folder": str(folder),
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def _seed_tag(args) -> str:
    return f"_seed{args.seed}" if args.seed else ""


def translation(args, judge: Judge, test_images, test_labels, out: Path, log) -> list[dict]:
    rows_idx = np.flatnonzero(test_labels == args.source)[: args.num]
    images = test_images[rows_idx]
    np.savez(out / "source.npz", images)
    rows = []
    for scale in args.translate_scales or (0.0, args.translate_scale):
        for strength in args.strengths:
            folder = out / f"sdedit_s{scale:g}_S{strength:g}"
            argv = ["edit", "--checkpoint", "fmnist_diffusion", "--images",
                    str(out / "source.npz"), "--strength", f"{strength:g}", "--sampler",
                    args.sdedit_sampler, "--steps", str(args.steps), "--batch-size", "50",
                    "--out", str(folder), "--no-progress"]  # fmt: skip
            if scale:
                argv += ["--classifier", "fmnist_classifier", "--classifier-scale", f"{scale:g}",
                         "--classes", str(args.target)]  # fmt: skip
            seconds = run(argv, log)
            edits = np.load(folder / f"edits_{len(images)}x28x28x1.npz")["arr_0"][..., 0]
            logits, _ = judge(edits)
            pred = logits.argmax(1).numpy()
            rows.append({
                "strength": strength, "scale": scale, "source": args.source,
                "target": args.target, "target_accuracy": float((pred == args.target).mean()),
                "source_accuracy": float((pred == args.source).mean()),
                "pixel_mae": float(np.abs(edits.astype(float) - images).mean()),
                "pixel_rmse": float(np.sqrt(((edits.astype(float) - images) ** 2).mean())),
                "seconds": seconds, "folder": str(folder),
            })  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def paired(out: Path, judge: Judge) -> list[dict]:
    """RePaint against replacement on the same images, seeds and guidance, from the runs in
    `out`: accuracies with binomial standard errors, the images only one of them gets right, and
    the accuracy on the images whose original the judge gets right / wrong."""
    images, labels = np.load(out / "inputs.npz")["arr_0"], np.load(out / "inputs.npz")["arr_1"]
    original_right = judge(images)[0].argmax(1).numpy() == labels
    rows = []
    for repaint in sorted(out.glob("inpaint_RePaint_s*")):
        other = out / repaint.name.replace("RePaint", "replacement")
        if not (other / "settings.json").exists() or not (repaint / "settings.json").exists():
            continue
        right = {}
        for name, folder in (("RePaint", repaint), ("replacement", other)):
            edits = np.load(next(folder.glob("edits_*.npz")))["arr_0"][..., 0]
            right[name] = judge(edits)[0].argmax(1).numpy() == labels
        row: dict = {"runs": repaint.name.removeprefix("inpaint_RePaint_")}
        for name, ok in right.items():
            p = ok.mean()
            row[name] = {"accuracy": float(p), "se": float(np.sqrt(p * (1 - p) / len(ok))),
                         "original_right": float(ok[original_right].mean()),
                         "original_wrong": float(ok[~original_right].mean())}  # fmt: skip
        for subset, where in (("", slice(None)), ("_originals_right", original_right)):
            rp, rl = right["RePaint"][where], right["replacement"][where]
            row[f"only_RePaint{subset}"] = int((rp & ~rl).sum())
            row[f"only_replacement{subset}"] = int((~rp & rl).sum())
            row[f"n{subset}"] = len(rp)
        row["originals_wrong"] = int((~original_right).sum())
        rows.append({**row, **_difference(row)})
        print(json.dumps(rows[-1]), flush=True)
    for scale in sorted({r["runs"].split("_")[0] for r in rows}):  # seeds pooled
        runs = [r for r in rows if r["runs"].split("_")[0] == scale]
        keys = [k for k in runs[0] if k.startswith(("only_", "n"))]
        pooled = {"runs": f"{scale} pooled over {len(runs)}", **{k: sum(r[k] for r in runs)
                                                                  for k in keys}}  # fmt: skip
        rows.append({**pooled, **_difference(pooled)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _difference(row: dict) -> dict:
    """RePaint's accuracy minus replacement's on the same images, with its paired standard error
    √(b + c − (b − c)²/n) / n (b, c: images only RePaint / only replacement gets right)."""
    out = {}
    for subset in ("", "_originals_right"):
        b, c, n = row[f"only_RePaint{subset}"], row[f"only_replacement{subset}"], row[f"n{subset}"]
        out[f"difference{subset}"] = (b - c) / n
        out[f"difference_se{subset}"] = float(np.sqrt(b + c - (b - c) ** 2 / n) / n)
    return out


def figures(out: Path, docs: Path, scale: float, count: int = 8) -> None:
    """docs/images/editing_inpaint.png (columns: input, masked input, replacement, RePaint, each
    unguided then guided) and editing_sdedit.png (input, then each strength, guided at `scale`)."""
    from adm.generate.sample import save_grid

    images = np.load(out / "inputs.npz")["arr_0"][:count]
    keep = np.load(out / "right_half.npz")["arr_0"][0] >= 128
    masked = np.where(keep, images, 128).astype(np.uint8)
    columns = [images, masked]
    runs = sorted(out.glob("inpaint_replacement_s*")) + sorted(out.glob("inpaint_RePaint_s*"))
    for folder in [f for f in runs if "_seed" not in f.name]:  # seed 0 only
        columns.append(np.load(next(folder.glob("edits_*.npz")))["arr_0"][:count, ..., 0])
    tiles = np.stack(columns, axis=1).reshape(-1, 28, 28, 1)
    save_grid(tiles, docs / "editing_inpaint.png", columns=len(columns))
    source = np.load(out / "source.npz")["arr_0"][:count]
    columns = [source]
    for folder in sorted(out.glob(f"sdedit_s{scale:g}_S*")):
        columns.append(np.load(next(folder.glob("edits_*.npz")))["arr_0"][:count, ..., 0])
    tiles = np.stack(columns, axis=1).reshape(-1, 28, 28, 1)
    save_grid(tiles, docs / "editing_sdedit.png", columns=len(columns))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/editing-bench")
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="DDPM steps (respaced)")
    p.add_argument("--jump", type=int, default=10)
    p.add_argument("--resample", type=int, default=10)
    p.add_argument("--scale", type=float, default=4.0, help="inpainting: classifier scale")
    p.add_argument("--source", type=int, default=7, help="SDEdit source class (7: sneaker)")
    p.add_argument("--target", type=int, default=5, help="SDEdit target class (5: sandal)")
    p.add_argument("--translate-scale", type=float, default=8.0)
    p.add_argument("--translate-scales", type=float, nargs="+", help="default: 0 and the above")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--sdedit-sampler", default="ddpm")
    p.add_argument("--only", choices=("inpaint", "sdedit"))
    p.add_argument("--inpaint-scales", type=float, nargs="+", help="default: 0 and --scale")
    p.add_argument("--seed", type=int, default=0, help="inpainting: --seed of the runs")
    p.add_argument("--equal-nfe", action="store_true", help="inpainting: only replacement with "
                   "RePaint's number of network calls")  # fmt: skip
    p.add_argument("--methods", nargs="+", choices=("RePaint", "replacement"),
                   default=["RePaint", "replacement"], help="inpainting: which to run")  # fmt: skip
    p.add_argument(
        "--solvers",
        nargs="+",
        metavar="SAMPLER:STEPS",
        help="inpainting: only "
        "DDPM replacement and replacement with these solvers, e.g. dpm++2m:10",
    )
    p.add_argument("--grid", default="karras", help="--solvers: their timestep grid")
    p.add_argument("--paired", action="store_true", help="only compare the RePaint and "
                   "replacement runs already in --out, image by image")  # fmt: skip
    p.add_argument("--figures", metavar="DOCS_IMAGES", help="only draw the docs' grids from --out")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.figures:
        figures(out, Path(args.figures), args.translate_scale)
        return
    judge = Judge(checkpoint.load_model("fmnist_judge")[0].eval())
    if args.paired:
        rows = paired(out, judge)
        (out / "results_paired.json").write_text(json.dumps(rows, indent=2) + "\n")
        return
    test_images, test_labels = fashion_mnist.load(fashion_mnist.find(None), "t10k")
    log: list[str] = []
    result: dict = {"load_average_start": os.getloadavg(), "settings": vars(args)}
    start = time.perf_counter()
    if args.only in (None, "inpaint"):
        images, labels = test_images[: args.num], test_labels[: args.num]
        result["inpainting"] = inpainting(args, judge, images, labels, out, log)
    if args.only in (None, "sdedit"):
        result["translation"] = translation(args, judge, test_images, test_labels, out, log)
    result.update(commands=log, seconds=round(time.perf_counter() - start, 1),
                  load_average_end=os.getloadavg())  # fmt: skip
    tag = f"{args.only or 'all'}{'_equal_nfe' if args.equal_nfe else ''}{_seed_tag(args)}"
    if args.solvers:
        tag += "_solvers_" + "-".join(args.solvers)
    if args.methods != ["RePaint", "replacement"]:
        tag += "_" + "-".join(args.methods)
    if args.inpaint_scales:
        tag += "_iscales" + "-".join(f"{s:g}" for s in args.inpaint_scales)
    if args.translate_scales:
        tag += "_scales" + "-".join(f"{s:g}" for s in args.translate_scales)
    (out / f"results_{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if shutil.which("uptime"):
        os.system("uptime")


if __name__ == "__main__":
    main()
