"""`adm demo --edit`: editing in miniature on the bundled Fashion-MNIST models (docs/editing.md).

The right half of 16 test images is inpainted by replacement (DDPM-25, and SDE-DPM-Solver++(2M)
on 20 Karras steps) and by a short RePaint (DDPM-25, r = 4, j = 10); 16 sneakers are pushed towards
"sandal" by SDEdit (strength 0.7, DDPM, classifier scale 8). The demo's judge scores every output:
accuracy on the true (or target) class, the error in the regenerated half and the seam across the
mask boundary. The same `adm.generate.edit` calls as `adm inpaint` / `adm edit`, one batch each.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from adm._util.atomic import atomic_path
from adm.cli.demo import WEIGHTS_DIR, load_models
from adm.data import fashion_mnist
from adm.evaluation.edits import masked_error, seam
from adm.evaluation.judge import Judge
from adm.generate import edit
from adm.generate.sample import save_grid


@dataclass(frozen=True)
class EditDemoSettings:
    num: int = 16  # test images to inpaint, and sneakers to translate
    steps: int = 25  # DDPM steps of replacement and RePaint
    repaint_resample: int = 4  # RePaint's r and j (the paper: 10 and 10)
    repaint_jump: int = 10
    solver_steps: int = 20  # SDE-DPM-Solver++(2M) replacement, on the Karras grid
    strength: float = 0.7
    sdedit_steps: int = 50  # of a whole-chain run; an edit at strength S takes round(S·steps)
    translate_scale: float = 8.0
    source: int = 7  # sneaker
    target: int = 5  # sandal
    seed: int = 0


def inpaint_jobs(s: EditDemoSettings) -> dict[str, edit.EditJob]:
    """The inpainting methods by their table name."""
    common = dict(batch_size=s.num, seed=s.seed)
    ddpm = f"DDPM-{s.steps}"
    return {
        f"replacement, {ddpm}": edit.EditJob(sampler="ddpm", steps=str(s.steps), **common),
        f"replacement, dpm++2m-sde-{s.solver_steps} karras": edit.EditJob(
            sampler="dpm++2m-sde", steps=str(s.solver_steps), grid="karras", **common
        ),
        f"RePaint, {ddpm}, r = {s.repaint_resample}, j = {s.repaint_jump}": edit.EditJob(
            sampler="ddpm",
            steps=str(s.steps),
            resample=s.repaint_resample,
            jump=s.repaint_jump,
            **common,
        ),
    }


def run_edit_demo(
    out_dir: Path,
    settings: EditDemoSettings = EditDemoSettings(),
    *,
    weights_dir: Path = WEIGHTS_DIR,
    data_dir: str | None = None,
    device: torch.device | None = None,
    log=print,
) -> dict:
    """Inpaint and translate, score with the judge, write edit_inpaint.png, edit_sdedit.png,
    edit_report.md and edit_metrics.json into `out_dir`; returns the metrics."""
    start = time.perf_counter()
    device = device or torch.device("cpu")
    folder = fashion_mnist.find(data_dir)
    models, presets = load_models(weights_dir, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = Judge(models["fmnist_judge"])
    test_images, test_labels = fashion_mnist.load(folder, "t10k")
    images, labels = test_images[: settings.num], test_labels[: settings.num]
    keep = np.zeros((28, 28), bool)
    keep[:, :14] = True  # the right half is regenerated
    base = dict(model=models["fmnist_diffusion"], out_dir=out_dir,
                diffusion_config=presets["fmnist_diffusion"].diffusion)  # fmt: skip
    rows, columns = [], [images, np.where(keep, images, 128).astype(np.uint8)]
    for name, job in inpaint_jobs(settings).items():
        run = edit.EditRun(job=job, images=images[..., None], masks=keep[None], **base)
        seconds, out = _timed(run)
        mae, rmse = masked_error(out, images, keep)
        rows.append({"method": name, "nfe": job.nfe(run.diffusion_config),
                     "judge_accuracy": _accuracy(judge, out, labels), "masked_mae": mae,
                     "masked_rmse": rmse, "seam": seam(out, keep), "seconds": seconds})  # fmt: skip
        log(f"adm demo --edit: {name}: {seconds} s")
        columns.append(out)
    _grid(columns, out_dir / "edit_inpaint.png")
    sneakers = test_images[test_labels == settings.source][: settings.num]
    job = edit.EditJob(mode="sdedit", sampler="ddpm", steps=str(settings.sdedit_steps),
                       strength=settings.strength,
                       batch_size=settings.num, seed=settings.seed,
                       classifier_scale=settings.translate_scale)  # fmt: skip
    run = edit.EditRun(job=job, images=sneakers[..., None], classifier=models["fmnist_classifier"],
                       labels=np.full(len(sneakers), settings.target), **base)  # fmt: skip
    seconds, out = _timed(run)
    pred = judge(out)[0].argmax(1).numpy()
    translation = {"strength": settings.strength, "scale": settings.translate_scale,
                   "nfe": job.nfe(run.diffusion_config),
                   "target_accuracy": float((pred == settings.target).mean()),
                   "source_accuracy": float((pred == settings.source).mean()),
                   "distance": float(np.abs(out.astype(float) - sneakers).mean()),
                   "seconds": seconds}  # fmt: skip
    log(f"adm demo --edit: SDEdit sneaker -> sandal: {seconds} s")
    _grid([sneakers, out], out_dir / "edit_sdedit.png")
    result = {"inpainting": rows, "translation": translation, "settings": asdict(settings),
              "seam_originals": seam(images, keep),
              "judge_accuracy_originals": _accuracy(judge, images, labels),
              "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    with atomic_path(out_dir / "edit_metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    with atomic_path(out_dir / "edit_report.md") as tmp:
        tmp.write_text(report(result))
    return result


def _timed(run: edit.EditRun) -> tuple[float, np.ndarray]:
    """One batch of `run` (all its images): (seconds, uint8 [N, 28, 28])."""
    start = time.perf_counter()
    device = next(run.model.parameters()).device
    diff = run.job.diffusion(run.diffusion_config)
    out = edit.edit_batch(run, diff, list(range(len(run.images))), device)
    return round(time.perf_counter() - start, 1), out[..., 0]


def _accuracy(judge: Judge, images: np.ndarray, labels: np.ndarray) -> float:
    return float((judge(images)[0].argmax(1).numpy() == labels).mean())


def _grid(columns: list[np.ndarray], path: Path) -> None:
    """One row per image, one column per array of `columns` (uint8 [N, 28, 28] each)."""
    tiles = np.stack(columns, axis=1).reshape(-1, 28, 28, 1)
    save_grid(tiles, path, columns=len(columns))


def table(result: dict) -> str:
    """The demo's two tables as Markdown."""
    lines = [
        "| inpainting (right half) | network calls | judge accuracy | masked error (RMSE) "
        "| seam | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["inpainting"]:
        lines.append(
            f"| {r['method']} | {r['nfe']} | {r['judge_accuracy']:.0%} | {r['masked_mae']:.1f} "
            f"({r['masked_rmse']:.1f}) | {r['seam']:.1f} | {r['seconds']} |"
        )
    t = result["translation"]
    lines += [
        "",
        "| SDEdit sneaker -> sandal | network calls | judge: sandal | judge: sneaker "
        "| distance to input | seconds |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| S = {t['strength']:g}, DDPM, classifier scale {t['scale']:g} | {t['nfe']} | "
        f"{t['target_accuracy']:.0%} | {t['source_accuracy']:.0%} | {t['distance']:.1f} | "
        f"{t['seconds']} |",
    ]
    return "\n".join(lines)


def report(result: dict) -> str:
    n = result["settings"]["num"]
    return f"""# adm demo --edit: inpainting and SDEdit on Fashion-MNIST

The right half of the first {n} test images regenerated (unguided) and {n} sneakers pushed
towards "sandal"; the judge scores the outputs. Masked error: mean |output − original| in grey
levels over the regenerated half; seam: mean |difference| of neighbouring pixels across the
mask boundary (the originals: {result["seam_originals"]:.1f}; the judge gets
{result["judge_accuracy_originals"]:.0%} of the unmasked originals). {n} images make every
percentage coarse (one image is {1 / n:.0%}): docs/editing.md has the 100-image measurements.

{table(result)}

![input, masked input, replacement DDPM, replacement SDE-DPM-Solver++, RePaint](edit_inpaint.png)
![sneaker, edited towards sandal](edit_sdedit.png)

Run time: {result["seconds"]} s.
"""
