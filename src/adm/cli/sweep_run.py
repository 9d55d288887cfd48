"""`adm sweep`'s cells and runs: solver × timestep grid × steps × guidance scale (× guidance
interval), each cell sampled and measured (issue 11: guided sampling in 10-20 network calls at the
quality of 250).

What is sampled and how a cell is scored is a `Subject` (`adm.cli.sweep_subjects`: the bundled
Fashion-MNIST models and the demo's judge, or a checkpoint and the Inception metrics). The
starting noise and any step noise of sample i come
from `sample_generator(seed, i, 0)`, so the cells of one seed differ only in solver settings.
Results go to `sweep.json` (one row per cell and seed, written atomically after each; a rerun
skips the cells it holds), `sweep.md` and `sweep.png` (`adm.cli.sweep_report`). The command is
`adm.cli.sweep`; docs/sampling.md.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adm._util import signals
from adm._util.atomic import atomic_path
from adm._util.lock import run_folder_lock

if TYPE_CHECKING:
    import numpy as np
    import torch

    from adm.diffusion.gaussian import Diffusion

FORMAT = "adm-sweep-v1"
Interval = tuple[float, float] | None


@dataclass(frozen=True)
class SweepSettings:
    """The cells (every combination of the first six fields, plus the reference per scale) and
    how many samples each cell draws. A solver is a sampler name, or a name with options
    (`solver_spec`: `unipc:order=3`, `edm:churn=40`)."""

    solvers: tuple[str, ...] = ("dpm++2m", "dpm++3m", "unipc", "ddim", "heun", "dpm++2m-sde")
    grids: tuple[str, ...] = ("karras", "ddim")
    steps: tuple[int, ...] = (10, 20)
    scales: tuple[float, ...] = (4.0,)
    intervals: tuple[Interval, ...] = (None,)  # guidance interval (lo, hi) in σ; None: always
    seeds: tuple[int, ...] = (0,)
    per_class: int = 10  # samples per class and cell
    classes: tuple[int, ...] = tuple(range(10))
    eta: float | None = None  # ddim / dpm++2m-sde's η (None: the sampler's default, 0 / 1)
    reference: tuple[str, int] | None = ("ddpm", 250)  # on the uniform grid, at every scale


@dataclass(frozen=True)
class Cell:
    solver: str
    grid: str
    steps: int
    scale: float
    interval: Interval
    eta: float | None  # the η used (None: the sampler has no η)
    seed: int
    reference: bool = False

    @property
    def key(self) -> str:
        """Identity of the cell without its seed (rows of several seeds share it)."""
        interval = "none" if self.interval is None else f"{self.interval[0]:g}:{self.interval[1]:g}"
        eta = "-" if self.eta is None else f"{self.eta:g}"
        return f"{self.solver}|{self.grid}|{self.steps}|{self.scale:g}|{interval}|{eta}"

    def row(self) -> dict[str, Any]:
        return {"cell": self.key, **dataclasses.asdict(self)}


def solver_spec(spec: str) -> tuple[str, dict[str, float]]:
    """A sweep's solver: a sampler name, optionally with its own options after colons
    (`unipc:order=3`, `edm:churn=40:s_noise=1.003`, `ddim:eta=1`) -> (name, options). A
    ValueError names what is wrong (unknown sampler, an option it lacks, a value out of range)."""
    from adm.diffusion import registry

    name, *parts = spec.split(":")
    registry.sampler_info(name)
    options: dict[str, float] = {}
    for part in parts:
        key, sep, text = part.partition("=")
        try:
            value = float(text) if sep and key else None
        except ValueError:
            value = None
        if value is None:
            raise ValueError(f"{part!r} is not OPTION=VALUE (expected NAME or "
                             "NAME:OPTION=VALUE, e.g. unipc:order=3 or edm:churn=40)")  # fmt: skip
        options[key] = int(value) if key == "order" and value.is_integer() else value
    registry.check_options(name, **options)
    return name, options


def effective_eta(solver: str, eta: float | None) -> float | None:
    """The η a solver (a `solver_spec`) runs with (None for solvers without one): its own
    `:eta=` first, then the sweep's --eta, then the sampler's default."""
    from adm.diffusion import registry

    name, options = solver_spec(solver)
    if "eta" not in registry.sampler_info(name).options:
        return None
    if "eta" in options:
        return options["eta"]
    return eta if eta is not None else (1.0 if name == "dpm++2m-sde" else 0.0)


def cells(settings: SweepSettings) -> list[Cell]:
    """Every cell and seed, seeds outermost, the reference cells of a scale after its sweep."""
    out: dict[tuple[str, int], Cell] = {}
    for seed in settings.seeds:
        for scale in settings.scales:
            # without guidance an interval changes nothing: one cell instead of one per interval
            intervals = settings.intervals if scale else (None,)
            for interval in dict.fromkeys(intervals):
                for steps in settings.steps:
                    for grid in settings.grids:
                        for solver in settings.solvers:
                            eta = effective_eta(solver, settings.eta)
                            cell = Cell(solver, grid, steps, scale, interval, eta, seed)
                            out.setdefault((cell.key, seed), cell)
            if settings.reference is not None:
                solver, steps = settings.reference
                eta = effective_eta(solver, settings.eta)
                cell = Cell(solver, "uniform", steps, scale, None, eta, seed, reference=True)
                out.setdefault((cell.key, seed), cell)
    return list(out.values())


def check_settings(settings: SweepSettings, diffusion: Diffusion) -> None:
    """Every value usable with this diffusion, or a ValueError naming the first bad one."""
    import math

    from adm.diffusion import guidance, registry

    for name, values in [("solvers", settings.solvers), ("grids", settings.grids),
                         ("steps", settings.steps), ("scales", settings.scales),
                         ("intervals", settings.intervals), ("seeds", settings.seeds)]:  # fmt: skip
        if not values:
            raise ValueError(f"--{name}: give at least one value")
    for solver in settings.solvers:
        solver_spec(solver)
    if min(settings.steps) < 1:
        raise ValueError(f"--steps must be positive integers, got {min(settings.steps)}")
    for scale in settings.scales:
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"--scales: a guidance scale must be finite and >= 0, got {scale}")
    for interval in settings.intervals:
        if interval is not None:
            guidance.check_interval(interval)
    if any(seed < 0 for seed in settings.seeds):
        raise ValueError(f"--seeds must be >= 0, got {min(settings.seeds)}")
    if settings.per_class < 1:
        raise ValueError(f"--per-class must be at least 1, got {settings.per_class}")
    if settings.per_class * len(settings.classes) < 4:
        raise ValueError(
            "a cell needs at least 4 samples (precision / recall use 3 nearest neighbours): "
            "raise --per-class or give more --classes"
        )
    if settings.eta is not None and not 0 <= settings.eta <= 1:
        raise ValueError(f"--eta must be between 0 and 1, got {settings.eta:g}")
    if settings.reference is not None:
        registry.sampler_info(settings.reference[0])
    for cell in cells(settings):
        least = registry.sampler_info(solver_spec(cell.solver)[0]).min_steps
        if cell.steps < least:
            raise ValueError(f"{cell.solver} needs at least {least} steps (--steps {cell.steps})")
        try:
            diffusion.grid(cell.grid, cell.steps)
        except ValueError as err:
            raise ValueError(f"grid {cell.grid} with {cell.steps} steps: {err}") from None


# ---- what is swept and how it is scored ----------------------------------------------------------


@dataclass
class Subject:
    """A diffusion network (as `model_fn(x_t, t, y=...)`), its noisy classifier, the un-respaced
    diffusion, the shape [C, H, W] of one image, and `measure(uint8 NHWC images, labels)` ->
    metrics. `setup` names the models and the scoring; a sweep.json made with another refuses."""

    model_fn: Callable[..., torch.Tensor]
    classifier: torch.nn.Module | None
    diffusion: Diffusion
    shape: tuple[int, int, int]
    measure: Callable[[np.ndarray, np.ndarray], dict[str, float]]
    setup: dict[str, Any]
    device: torch.device


# ---- running -------------------------------------------------------------------------------------


def sample_cell(
    subject: Subject, cell: Cell, labels: torch.Tensor, batch_size: int, on_call=None
) -> tuple[np.ndarray, int]:
    """uint8 NHWC samples of `cell` for `labels`, and the network calls per batch (NFE)."""
    import numpy as np
    import torch

    from adm.diffusion import grids, guidance, registry
    from adm.diffusion.gaussian import draw_noise
    from adm.generate.sample import sample_generator, to_uint8

    diff = subject.diffusion
    timesteps = grids.timestep_grid(cell.grid, cell.steps, diff.schedule.original.alphas_cumprod)
    cond_fn = None
    if cell.scale:
        cond_fn = guidance.classifier_cond_fn(
            subject.classifier, cell.scale, interval=cell.interval, diff=diff
        )
    calls = [0]

    def model_fn(x, t, **kwargs):
        calls[0] += 1
        if on_call is not None:
            on_call(len(x))
        return subject.model_fn(x, t, **kwargs)

    name, options = solver_spec(cell.solver)
    if cell.eta is not None:
        options["eta"] = cell.eta
    out, batches = [], 0
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size]
        gens = [sample_generator(cell.seed, start + i, 0, subject.device) for i in range(len(y))]
        noise = draw_noise(torch.empty(len(y), *subject.shape, device=subject.device), gens)
        with torch.no_grad():
            x = registry.sample(name, model_fn, diff, noise, timesteps=timesteps,
                                cond_fn=cond_fn, model_kwargs={"y": y}, generator=gens,
                                **options)  # fmt: skip
        out.append(to_uint8(x))
        batches += 1
    return np.concatenate(out), calls[0] // batches


def read_rows(path: Path, setup: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an existing sweep.json made with the same `setup` (none if there is no file)."""
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT or not isinstance(data.get("rows"), list):
            raise ValueError("not an adm sweep file")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(
            f"{path}: unreadable ({err}); move it away or choose another --out"
        ) from None
    old = data.get("setup", {})
    differ = sorted(k for k in setup if k not in old or old[k] != setup[k])
    if differ:
        raise ValueError(
            f"{path} was made with other settings ({', '.join(differ)} differ): its cells would "
            "not compare with these; choose another --out"
        )
    return data["rows"]


def run_sweep(
    out_dir: Path,
    settings: SweepSettings,
    subject: Subject,
    *,
    batch_size: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Sample and measure every cell of `settings` missing from `out_dir/sweep.json`, writing
    the file after each; then sweep.md and sweep.png over all its rows. One process at a time
    per folder (`adm._util.lock`; a second one stops with a ValueError naming the holder)."""
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from adm.cli import sweep_report
    from adm.diffusion import registry

    path = out_dir / "sweep.json"
    read_rows(path, subject.setup)  # refuse a foreign sweep.json before creating anything
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(out_dir, "adm sweep"):
        rows = read_rows(path, subject.setup)
        done = {(r["cell"], r["seed"]) for r in rows}
        todo = [c for c in cells(settings) if (c.key, c.seed) not in done]
        labels_np = np.repeat(np.array(settings.classes), settings.per_class)
        labels = torch.from_numpy(labels_np).to(subject.device)
        work = len(labels) * sum(registry.nfe(solver_spec(c.solver)[0], c.steps) for c in todo)
        bar = tqdm(total=work, unit="img·NFE", desc="adm sweep", disable=not progress)
        for cell in todo:
            bar.set_postfix_str(f"{cell.solver} {cell.grid} {cell.steps} s={cell.scale:g}")
            start = time.perf_counter()
            images, nfe = sample_cell(subject, cell, labels, batch_size, bar.update)
            row = {**cell.row(), "nfe": nfe, **subject.measure(images, labels_np)}
            row["seconds"] = round(time.perf_counter() - start, 2)
            rows.append(row)
            write_json(path, subject.setup, rows)
            sweep_report.write_markdown(out_dir, subject.setup, rows)
            if signals.requested():
                bar.close()
                signals.stop_if_requested(
                    f"after {len(rows)} cell(s) in {path}; rerun the same command to add the rest"
                )
        bar.close()
        write_json(path, subject.setup, rows)
        sweep_report.write_markdown(out_dir, subject.setup, rows)
        metric = {"judge": "judge features", "inception": "Inception"}.get(subject.setup["metric"])
        sweep_report.plot(out_dir / "sweep.png", rows, metric)
    return {"format": FORMAT, "setup": subject.setup, "rows": rows, "new": len(todo)}


def write_json(path: Path, setup: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from adm.cli import sweep_report

    data = {"format": FORMAT, "setup": setup, "rows": rows,
            "summary": sweep_report.summarize(rows)}  # fmt: skip
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")
