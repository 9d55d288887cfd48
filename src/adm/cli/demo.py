"""`adm demo`: the paper's trade-off in miniature (Dhariwal & Nichol 2021, §4 and Fig. 4).

An unconditional diffusion model of Fashion-MNIST is steered towards requested classes by a noisy
classifier (Algorithm 2, DDIM-25 with η = 1 by default) at guidance scales 0, 1, 2, 4, 8, plus
DPM-Solver++(2M) at 10 steps. A separate "judge" classifier trained on clean images stands in for
the Inception network: its accuracy on the requested class measures fidelity to the class, and
FID / precision / recall in its feature space against the test set measure quality and
diversity. Weights ship with the package (`adm/models/weights/`); `--retrain` trains all three with
adm's own training code first.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from adm._util.atomic import atomic_path
from adm.data import fashion_mnist
from adm.diffusion import guidance, samplers, solvers
from adm.diffusion.gaussian import Diffusion, draw_noise
from adm.evaluation.judge import Judge, judge_metrics, judge_reference
from adm.generate.sample import sample_generator, save_grid, to_uint8
from adm.models import checkpoint

WEIGHTS_DIR = checkpoint.BUNDLED_DIR
MODELS = ("fmnist_diffusion", "fmnist_classifier", "fmnist_judge")


@dataclass(frozen=True)
class DemoSettings:
    per_class: int = 10  # samples per requested class and scale
    classes: tuple[int, ...] = tuple(range(10))
    scales: tuple[float, ...] = (0.0, 1.0, 2.0, 4.0, 8.0)
    steps: str = "ddim25"
    # DDIM's η: 1 draws fresh noise at every step, 0 is deterministic (docs/demo.md)
    eta: float = 1.0
    dpm_steps: int = 10
    dpm_scale: float = 4.0
    reference_size: int = 2000  # test images for FID, precision / recall and judge accuracy
    pr_draws: int = 10  # precision / recall: mean over this many same-sized reference draws
    seed: int = 0


def load_models(weights_dir: Path, device: torch.device) -> tuple[dict[str, nn.Module], dict]:
    """The three demo networks (float32, eval mode) and their presets, by preset name."""
    models, presets = {}, {}
    for name in MODELS:
        path = weights_dir / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"demo weights {path} not found (run `adm demo --retrain`)")
        model, preset = checkpoint.load_model(path, device=device)
        if preset.name != name:
            raise ValueError(f"{path} holds {preset.name}, expected {name}")
        models[name], presets[name] = model.eval(), preset
    return models, presets


def _sample(
    models, presets, settings: DemoSettings, labels: Tensor, scale: float, solver: str, bar
):
    """Images [N, 28, 28] uint8 for `labels`, with per-sample seeds shared across scales."""
    net, clf = models["fmnist_diffusion"], models["fmnist_classifier"]
    # both solvers use DDIM strides (0, s, 2s, ...): the cosine schedule's last step has ᾱ ≈ 0
    steps = settings.steps if solver == "ddim" else f"ddim{settings.dpm_steps}"
    config = presets["fmnist_diffusion"].diffusion
    diff = Diffusion.from_config(dataclasses.replace(config, timestep_respacing=steps))
    device = labels.device
    gens = [sample_generator(settings.seed, i, 0, device) for i in range(len(labels))]
    noise = draw_noise(torch.empty(len(labels), 1, 28, 28, device=device), gens)
    cond_fn = guidance.classifier_cond_fn(clf, scale) if scale else None

    def model_fn(x: Tensor, t: Tensor, **_: Tensor) -> Tensor:
        out = net(x, t)
        bar.update(len(x))
        return out

    kwargs = {"cond_fn": cond_fn, "model_kwargs": {"y": labels}}
    if solver == "ddim":
        # the per-sample generators go on to draw each sample's step noise (η > 0)
        images = samplers.ddim_sample(
            model_fn, diff, noise, eta=settings.eta, generator=gens, **kwargs
        )
    else:
        images = solvers.dpm_solver_sample(model_fn, diff, noise, **kwargs)
    return to_uint8(images)[..., 0]


def run_demo(
    out_dir: Path,
    settings: DemoSettings = DemoSettings(),
    *,
    weights_dir: Path = WEIGHTS_DIR,
    data_dir: str | None = None,
    device: torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Sample, measure, and write grids, plot, report.md and metrics.json into `out_dir`."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device = device or torch.device("cpu")
    folder = fashion_mnist.find(data_dir)
    models, presets = load_models(weights_dir, device)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs are known to be there
    judge = Judge(models["fmnist_judge"])
    test_images, test_labels = fashion_mnist.load(folder, "t10k")
    ref = judge_reference(judge, test_images, test_labels, settings.reference_size, settings.seed)
    labels_np = np.repeat(np.array(settings.classes), settings.per_class)
    labels = torch.from_numpy(labels_np).to(device)
    n = len(labels)
    runs = [("ddim", s) for s in settings.scales] + [("dpm++2m", settings.dpm_scale)]
    work = n * (len(settings.scales) * _num_steps(settings.steps) + settings.dpm_steps)
    bar = tqdm(total=work, unit="img·step", desc="demo sampling", disable=not progress)
    rows = []
    for solver, scale in runs:
        images = _sample(models, presets, settings, labels, scale, solver, bar)
        grid = out_dir / f"grid_{solver.replace('+', 'p')}_scale{scale:g}.png"
        # one column per class: [classes, per_class] -> rows of samples, columns of classes
        by_column = images.reshape(len(settings.classes), settings.per_class, 28, 28)
        by_column = by_column.transpose(1, 0, 2, 3).reshape(n, 28, 28, 1)
        save_grid(by_column, grid, columns=len(settings.classes))
        steps = _num_steps(settings.steps) if solver == "ddim" else settings.dpm_steps
        row = {"solver": solver, "steps": steps, "scale": scale, "grid": grid.name}
        draws = min(settings.pr_draws, settings.reference_size // n)
        row.update(judge_metrics(judge, images, labels_np, ref, draws, settings.seed))
        rows.append(row)
    bar.close()
    result = {
        "scales": [r for r in rows if r["solver"] == "ddim"],
        "dpm_solver": next(r for r in rows if r["solver"] == "dpm++2m"),
        "judge_test_accuracy": ref.accuracy,
        "settings": dataclasses.asdict(settings),
        "num_samples_per_scale": n,
        "reference_images": len(ref.labels),
        "data": str(folder),
        "weights": str(weights_dir),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_outputs(out_dir, result)
    return result


def _num_steps(respacing: str) -> int:
    return int(respacing.removeprefix("ddim"))


def table(result: dict) -> str:
    """The demo's table as Markdown."""
    lines = [
        "| solver | steps | scale | judge accuracy | FID (judge) | precision | recall |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in [*result["scales"], result["dpm_solver"]]:
        lines.append(
            f"| {r['solver']} | {r['steps']} | {r['scale']:g} | {r['accuracy']:.1%} | "
            f"{r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |"
        )
    return "\n".join(lines)


def write_outputs(out_dir: Path, result: dict) -> None:
    with atomic_path(out_dir / "metrics.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    plot = _plot(out_dir / "tradeoff.png", result)
    grids = "\n".join(
        f"- scale {r['scale']:g} ({r['solver']}, {r['steps']} steps): ![]({r['grid']})"
        for r in [*result["scales"], result["dpm_solver"]]
    )
    names = ", ".join(f"{i}: {c}" for i, c in enumerate(fashion_mnist.CLASS_NAMES))
    report = f"""# adm demo: classifier guidance on Fashion-MNIST

An unconditional diffusion model steered by a noisy classifier towards requested classes (one
column per class: {names}). The judge, a classifier trained on clean images (accuracy
{result["judge_test_accuracy"]:.1%} on the {result["reference_images"]} test images used here),
scores the samples; FID, precision and recall use its features against those test images
({result["num_samples_per_scale"]} samples per scale; DDIM with η = {result["settings"]["eta"]:g}).

{table(result)}

{"![trade-off](tradeoff.png)" if plot else ""}

{grids}

Run time: {result["seconds"]} s.
"""
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text(report)


def _plot(path: Path, result: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["scales"]
    scales = [r["scale"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for ax, key, title in zip(
        axes, ("accuracy", "precision", "recall", "fid"),
        ("judge accuracy (fidelity)", "precision", "recall (diversity)", "FID (judge features)"),
        strict=True,
    ):  # fmt: skip
        eta = result["settings"]["eta"]
        ax.plot(scales, [r[key] for r in rows], "o-", label=f"DDIM-25, η = {eta:g}")
        dpm = result["dpm_solver"]
        ax.plot([dpm["scale"]], [dpm[key]], "s", label=f"DPM-Solver++ {dpm['steps']}")
        ax.set_title(title)
        ax.set_xlabel("guidance scale")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return True


# ---- --retrain: the exact `adm train*` commands that made the bundled weights ------------------

EXPORT_DIFFUSION = "ema_0.999"  # the diffusion model is bundled as this EMA (docs/demo.md)

# (run name, adm arguments after --data/--out, the file of the run's last step bundled as its
# weights: "model" for the raw weights, "ema_<rate>" for an EMA, None for an intermediate stage).
# "{run}" in an argument stands for the raw model of an earlier run's last step.
TRAINING: list[tuple[str, list[str], str | None]] = [
    ("fmnist_diffusion_stage1",
     ["train", "--preset", "fmnist_diffusion", "--steps", "2000",
      "--batch-size", "64", "--lr", "3e-4", "--ema-rate", "0.999,0.9995", "--no-flip",
      "--log-interval", "50", "--save-interval", "250", "--keep", "2", "--seed", "1"],
     None),
    ("fmnist_diffusion",  # a second stage from the first one's weights, the LR annealed to 0
     ["train", "--preset", "fmnist_diffusion", "--init-from", "{fmnist_diffusion_stage1}",
      "--steps", "4000", "--batch-size", "64", "--lr", "3e-4", "--anneal-lr",
      "--ema-rate", "0.999,0.9995", "--no-flip", "--log-interval", "50", "--save-interval", "500",
      "--keep", "3", "--seed", "6"],
     EXPORT_DIFFUSION),
    ("fmnist_classifier_stage1",
     ["train-classifier", "--preset", "fmnist_classifier", "--steps", "600",
      "--batch-size", "128", "--lr", "3e-4", "--weight-decay", "0.05", "--anneal-lr",
      "--no-flip", "--no-random-crop", "--log-interval", "50", "--save-interval", "200",
      "--eval-interval", "200", "--keep", "2", "--seed", "2"],
     None),
    ("fmnist_classifier_stage2",  # annealed stages, each from the previous one's weights
     ["train-classifier", "--preset", "fmnist_classifier", "--init-from",
      "{fmnist_classifier_stage1}", "--steps", "600", "--batch-size", "128", "--lr", "3e-4",
      "--weight-decay", "0.05", "--anneal-lr", "--no-flip", "--no-random-crop",
      "--log-interval", "50", "--save-interval", "200", "--eval-interval", "200", "--keep", "2",
      "--seed", "5"],
     None),
    ("fmnist_classifier",
     ["train-classifier", "--preset", "fmnist_classifier", "--init-from",
      "{fmnist_classifier_stage2}", "--steps", "5000", "--batch-size", "128", "--lr", "3e-4",
      "--weight-decay", "0.05", "--anneal-lr", "--no-flip", "--no-random-crop",
      "--log-interval", "50", "--save-interval", "500", "--eval-interval", "500", "--keep", "3",
      "--seed", "7"],
     "model"),
    ("fmnist_judge_stage1",
     ["train-classifier", "--preset", "fmnist_judge", "--steps", "1200",
      "--batch-size", "128", "--lr", "2e-3", "--anneal-lr", "--no-noise", "--no-flip",
      "--no-random-crop", "--log-interval", "50", "--save-interval", "300",
      "--eval-interval", "300", "--eval-size", "2000", "--keep", "2", "--seed", "3"],
     None),
    ("fmnist_judge",  # a second, lower-LR stage from the first one's weights
     ["train-classifier", "--preset", "fmnist_judge", "--init-from", "{fmnist_judge_stage1}",
      "--steps", "600", "--batch-size", "128", "--lr", "5e-4", "--anneal-lr", "--no-noise",
      "--no-flip", "--no-random-crop", "--log-interval", "50", "--save-interval", "300",
      "--eval-interval", "300", "--eval-size", "2000", "--keep", "2", "--seed", "4"],
     "model"),
]  # fmt: skip


def training_command(index: int, data: Path, work_dir: Path, resolve=None) -> list[str]:
    """The `adm ...` command of stage `index` of `TRAINING`; "{run}" placeholders become
    `resolve(run_dir)` (default: a readable placeholder, for the documentation)."""
    name, args, _ = TRAINING[index]
    resolve = resolve or (lambda run_dir: f"{run_dir}/model_<last step>.safetensors")
    earlier = {n for n, _, _ in TRAINING[:index]}
    used = {a[1:-1] for a in args if a.startswith("{") and a.endswith("}")}
    if used - earlier:
        raise ValueError(f"stage {name} reads {sorted(used - earlier)}, not earlier stages")
    refs = {n: resolve(work_dir / n) for n in used}
    args = [a.format(**refs) for a in args]
    return ["adm", args[0], "--data", str(data), "--out", str(work_dir / name), *args[1:]]


def _last_model(run_dir: Path) -> str:
    return str(_last_checkpoint(run_dir, "model"))


def _last_checkpoint(run_dir: Path, which: str) -> Path:
    """The raw model ("model") or an EMA ("ema_<rate>") of the run's last saved step."""
    from adm.training import state as train_state

    step = train_state.latest_step(run_dir)
    if which == "model":
        return train_state.model_path(run_dir, step)
    return train_state.ema_path(run_dir, float(which.removeprefix("ema_")), step)


def training_chains(jobs: int = 2) -> list[list[int]]:
    """Stage indices of `TRAINING` in the order they run: with 2 jobs the diffusion stages in one
    chain and the classifier stages in another, side by side (no stage reads the other chain)."""
    diffusion = [i for i, (_, args, _) in enumerate(TRAINING) if args[0] == "train"]
    others = [i for i in range(len(TRAINING)) if i not in diffusion]
    return [diffusion + others] if jobs == 1 else [diffusion, others]


def retrain(
    work_dir: Path, data_dir: str | None = None, progress: bool = True, jobs: int = 2
) -> Path:
    """Train the demo models from scratch with `adm train` / `adm train-classifier` (rerunning
    continues an interrupted run) and export them to `work_dir/weights`. With `jobs` = 2 the
    diffusion and classifier stages run side by side, one thread each; the second chain's output
    goes to `work_dir/<stage>.log`."""
    import contextlib
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    if jobs not in (1, 2):
        raise ValueError(f"--retrain runs 1 or 2 jobs at once, got {jobs}")
    folder = fashion_mnist.find(data_dir)
    weights = work_dir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def run_chain(stages: list[int], shown: bool) -> None:
        for index in stages:
            name, _, export = TRAINING[index]
            cmd = training_command(index, folder, work_dir, resolve=_last_model)
            flags = [] if progress and shown else ["--no-progress"]
            cmd = [sys.executable, "-m", "adm.cli.main", *cmd[1:], *flags]
            log = None if shown else work_dir / f"{name}.log"
            where = "" if log is None else f" (output: {log})"
            print(f"adm demo --retrain: adm {' '.join(cmd[3:])}{where}", file=sys.stderr)
            with open(log, "a") if log else contextlib.nullcontext() as out:
                stream = {"stdout": out, "stderr": subprocess.STDOUT} if log else {}
                code = subprocess.run(cmd, env=env, check=False, **stream).returncode
            if code != 0:
                raise ValueError(
                    f"training stage {name} failed (exit code {code}"
                    + (f"; see {log}" if log else "")
                    + "); rerun `adm demo --retrain` to continue from its last checkpoint"
                )
            if export is not None:
                export_weights(
                    _last_checkpoint(work_dir / name, export), weights / f"{name}.safetensors"
                )

    chains = training_chains(jobs)
    with ThreadPoolExecutor(len(chains)) as pool:
        futures = [pool.submit(run_chain, chain, i == 0) for i, chain in enumerate(chains)]
    for future in futures:
        future.result()  # the first failure, once every chain has stopped
    return weights


def export_weights(source: Path, target: Path) -> Path:
    """Copy a trained checkpoint as float16 safetensors with its preset (halves the size; the
    demo loads it back as float32)."""
    state = checkpoint.load_state_dict(source)
    preset = checkpoint.read_preset(source)
    if preset is None:
        raise ValueError(f"{source} carries no preset metadata")
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return checkpoint.write_state_dict(half, preset, target)
