"""Sampling runs: many images from a diffusion model, guided or not, resumable and multi-process.

Owns what `adm sample` / `adm upsample` do around the samplers: per-sample seeds (sample i's
noise and label come from its own generator derived from (seed, i), so images do not depend on the
batch size or the number of processes), splitting batches across torchrun ranks, one atomically
written file per finished batch (so `--resume` continues an interrupted run), and the outputs:
the original's `.npz` (`arr_0` uint8 NHWC quantised by truncation, `arr_1` labels), a PNG grid,
optional PNGs per image and a JSON of the fully resolved settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from adm._util import dist, runtime, signals
from adm._util.atomic import atomic_path, atomic_write_text
from adm._util.runtime import Precision
from adm.diffusion import guidance, registry
from adm.diffusion.gaussian import Diffusion, DiffusionConfig
from adm.diffusion.registry import SamplerName


class NonFiniteError(RuntimeError):
    """A sampled batch holds NaN or inf: the run stops before writing it."""


@dataclass(frozen=True)
class SampleJob:
    """What to sample. `steps` is the original's respacing string ("250", "ddim25", "25"), or
    with `grid` (a name of `adm.diffusion.grids`) the number of steps on that grid. `eta`,
    `order`, `churn`, `s_noise`: the sampler's own options (None: its default)."""

    sampler: SamplerName = "ddim"
    steps: str = "ddim25"
    grid: str | None = None
    num_samples: int = 16
    batch_size: int = 4
    classes: tuple[int, ...] | None = None  # None: random labels (class-conditional runs)
    seed: int = 0
    classifier_scale: float = 0.0
    cfg_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None  # σ range where guidance applies
    eta: float | None = None
    order: int | None = None
    churn: float | None = None
    s_noise: float | None = None
    clip_denoised: bool = True
    precision: Precision = "fp32"
    save_pngs: bool = False

    def __post_init__(self) -> None:
        registry.check_options(self.sampler, **self.sampler_options)
        if self.guidance_interval is not None:
            guidance.check_interval(self.guidance_interval)
        if self.num_samples < 1 or self.batch_size < 1:
            raise ValueError("--num-samples and --batch-size must be positive")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"unknown precision {self.precision!r}: expected fp32, bf16 or fp16")

    @property
    def sampler_options(self) -> dict[str, float | int]:
        """The sampler options that were set (the others take the sampler's defaults)."""
        names = ("eta", "order", "churn", "s_noise")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def diffusion(self, config: DiffusionConfig) -> Diffusion:
        """The diffusion of `config` on this job's steps: a respacing string or a named grid."""
        return diffusion_on_steps(config, self.steps, self.grid)

    def num_steps(self, config: DiffusionConfig) -> int:
        """How many timesteps the sampler visits."""
        return self.diffusion(config).num_steps

    def nfe(self, config: DiffusionConfig) -> int:
        """Network calls per image batch (`adm.diffusion.registry.nfe`)."""
        return registry.nfe(self.sampler, self.num_steps(config))


def diffusion_on_steps(config: DiffusionConfig, steps: str, grid: str | None) -> Diffusion:
    """The diffusion of `config` respaced to `steps` (the original's respacing string), or with
    `grid` (a name of `adm.diffusion.grids`) to `steps` timesteps of that grid."""
    if grid is None:
        return Diffusion.from_config(dataclasses.replace(config, timestep_respacing=steps))
    try:
        count = int(steps)
    except ValueError:
        message = f"with a grid, steps is a number of steps (e.g. 20), got {steps!r}"
        raise ValueError(message) from None
    return Diffusion.from_config(config).grid(grid, count)


def sample_generator(seed: int, index: int, stream: int, device: torch.device) -> torch.Generator:
    """The generator of sample `index` (stream 0: noise, 1: label), a pure function of its
    arguments: the same image whatever the batch or process it is drawn in."""
    words = np.random.SeedSequence([seed, index, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(words[0]) << 32 | int(words[1]))


def sample_labels(job: SampleJob, num_classes: int) -> np.ndarray:
    """Label of every sample: the requested classes in turn, or one random draw per sample."""
    if job.classes:
        return np.array([job.classes[i % len(job.classes)] for i in range(job.num_samples)])
    cpu = torch.device("cpu")
    return np.array(
        [
            int(torch.randint(num_classes, (1,), generator=sample_generator(job.seed, i, 1, cpu)))
            for i in range(job.num_samples)
        ]
    )


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC exactly as the original: ((x + 1)·127.5).clamp(0, 255) then a
    truncating cast (not rounding)."""
    x = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


@dataclass
class Run:
    """Everything fixed for one sampling run."""

    model: nn.Module
    diffusion_config: DiffusionConfig
    job: SampleJob
    out_dir: Path
    num_classes: int | None = None  # labels drawn/validated in range(num_classes)
    class_conditional: bool = False  # the diffusion network itself takes y
    classifier: nn.Module | None = None
    null_label: int | None = None  # classifier-free guidance
    low_res: np.ndarray | None = None  # super-resolution: uint8 NHWC base samples
    settings: dict = dataclasses.field(default_factory=dict)  # extra facts for the JSON
    labels: np.ndarray | None = None  # filled by `run_sampling` unless given (super-res: base's)


def _batch_path(out_dir: Path, k: int) -> Path:
    return out_dir / "batches" / f"batch_{k:06d}.npz"


def _atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _model_fn(run: Run, diff: Diffusion) -> Callable[..., Tensor]:
    """`model_fn(x, t, y=..., low_res=...)` for the samplers: labels only for class-conditional
    networks (an unconditional model can still be classifier-guided), classifier-free guidance
    around it when asked."""
    fn: Callable[..., Tensor] = run.model
    if not run.class_conditional:
        fn = guidance.unconditional_model_fn(run.model)
    if run.job.cfg_scale is not None:
        if run.null_label is None:
            raise ValueError("classifier-free guidance needs the model's null label")
        fn = guidance.classifier_free_model_fn(
            fn, run.job.cfg_scale, null_label=run.null_label,
            interval=run.job.guidance_interval, diff=diff,
        )  # fmt: skip
    return fn


def sample_batch(run: Run, diff: Diffusion, indices: list[int], device: torch.device) -> Tensor:
    """Images [len(indices), C, H, W] in [-1, 1] for the given global sample indices."""
    job, cfg = run.job, run.model.config
    labels = torch.as_tensor(run.labels[indices], device=device)
    low_res = None
    if run.low_res is not None:
        lr = torch.from_numpy(run.low_res[indices]).to(device).permute(0, 3, 1, 2)
        low_res = lr.float() / 127.5 - 1
    size = cfg.image_size
    gens = [sample_generator(job.seed, i, 0, device) for i in indices]
    noise = torch.stack(
        [torch.randn(cfg.in_channels, size, size, generator=g, device=device) for g in gens]
    )
    model_fn = _model_fn(run, diff)
    cond_fn = None
    if run.classifier is not None and job.classifier_scale != 0:
        cond_fn = guidance.classifier_cond_fn(
            run.classifier, job.classifier_scale, interval=job.guidance_interval, diff=diff
        )
    model_kwargs = {"y": labels, **({} if low_res is None else {"low_res": low_res})}
    # every sampler gets the per-sample generators (the deterministic ones draw nothing)
    return registry.sample(
        job.sampler, model_fn, diff, noise, cond_fn=cond_fn, clip_denoised=job.clip_denoised,
        model_kwargs=model_kwargs, generator=gens, **job.sampler_options,
    )  # fmt: skip


def prepare_output(out_dir: Path, resume: bool, num_batches: int, record: dict) -> list[int]:
    """Check that `out_dir` is writable and fits `resume`; return the finished batches.

    `run.json` records the settings; `--resume` refuses a folder made with other settings.
    """
    try:
        (out_dir / "batches").mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"cannot write to output folder {out_dir}: {err.strerror}") from None
    done = [k for k in range(num_batches) if _batch_path(out_dir, k).exists()]
    run_file = out_dir / "run.json"
    text = json.dumps(record, indent=2, sort_keys=True, default=str) + "\n"
    if done and not resume:
        raise ValueError(
            f"{out_dir} already holds {len(done)} finished batch(es) of a run: pass --resume to "
            "continue it, or choose another --out"
        )
    if resume and run_file.exists() and run_file.read_text() != text:
        changes = _differences(_read_record(run_file), json.loads(text))
        raise ValueError(
            f"{out_dir} holds a run with other settings ({changes}); --resume continues only "
            "the same run: choose another --out"
        )
    atomic_write_text(run_file, text)  # a failed write leaves the old run.json, never 0 bytes
    return done


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _flat(record: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(old: dict, new: dict) -> str:
    """ "job.seed: 5 -> 6; checkpoint_sha256: 1a2b3c4d… -> 9f8e7d6c…" for what differs."""
    a, b = _flat(old), _flat(new)

    def show(value: object) -> str:
        text = "(absent)" if value is _ABSENT else json.dumps(value, default=str)
        return text[:13] + "…" if len(text) > 16 else text

    keys = [k for k in dict.fromkeys([*b, *a]) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
    parts = [f"{k}: {show(a.get(k, _ABSENT))} -> {show(b.get(k, _ABSENT))}" for k in keys[:6]]
    return "; ".join(parts) + ("; ..." if len(keys) > 6 else "") or "run.json is unreadable"


_ABSENT = object()


def run_record(run: Run) -> dict:
    """The fully resolved settings of a run (what settings.json and run.json record)."""
    return {
        "job": dataclasses.asdict(run.job),
        "nfe": run.job.nfe(run.diffusion_config),  # network calls per batch (Heun: 2N − 1)
        "diffusion": dataclasses.asdict(run.diffusion_config),
        **run.settings,
    }


def check_fits_in_memory(num_samples: int, config) -> None:
    """The finished .npz is assembled in memory: refuse, before any work, a --num-samples whose
    uint8 images would not fit in this machine's memory."""
    size = config.image_size**2 * config.in_channels * num_samples
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: only the absurd is refused
        memory = 1 << 40
    if size > memory:
        raise ValueError(
            f"--num-samples {num_samples}: the samples take {size / 2**30:.3g} GiB, more than "
            f"this machine's {memory / 2**30:.3g} GiB of memory; sample in several runs"
        )


def run_sampling(run: Run, *, resume: bool = False, progress: bool = True) -> dict[str, Path]:
    """Sample `run.job.num_samples` images; rank r of a torchrun world takes batches r, r+W, ...
    Returns the written paths (on rank 0; other ranks return {})."""
    job, out_dir = run.job, run.out_dir
    device = _device_of(run.model)  # under torchrun: this rank's device, chosen by the caller
    check_fits_in_memory(job.num_samples, run.model.config)
    info = dist.setup(str(device)) if dist_world() > 1 else dist.DistInfo(device=device)
    num_batches = math.ceil(job.num_samples / job.batch_size)
    if run.labels is None:  # unconditional runs carry label 0 (not written to the .npz)
        num = run.num_classes
        run.labels = sample_labels(job, num) if num else np.zeros(job.num_samples, np.int64)
        if num and run.labels.max() >= num:
            raise ValueError(f"class {int(run.labels.max())} is out of range for {num} classes")
    done, error = [], None
    if info.is_main:
        try:
            done = prepare_output(out_dir, resume, num_batches, run_record(run))
        except ValueError as err:
            error = str(err)
    done, error = dist.broadcast_object((done, error))
    if error:  # every rank stops with the same message, none hangs
        raise ValueError(error)
    done = set(done)
    diff = job.diffusion(run.diffusion_config)
    mine = [k for k in range(num_batches) if k % info.world_size == info.rank and k not in done]
    bar = _progress(job.num_samples, len(done) * job.batch_size, progress and info.is_main)
    start, count = time.perf_counter(), 0
    for k in mine:
        indices = list(range(k * job.batch_size, min((k + 1) * job.batch_size, job.num_samples)))
        with runtime.autocast(device, job.precision):  # bf16/fp16 on CUDA only
            images = sample_batch(run, diff, indices, device)
        if not torch.isfinite(images).all():
            raise NonFiniteError(
                f"sampling produced NaN or inf in batch {k} (samples {indices[0]}-{indices[-1]}); "
                "nothing of it was written (finished batches are kept). A guidance scale too "
                "large for this precision, or a diverged model, causes this"
            )
        _atomic_savez(_batch_path(out_dir, k), images=to_uint8(images), indices=np.array(indices))
        if signals.requested():
            finished = len(list((out_dir / "batches").glob("batch_*.npz")))
            signals.stop_if_requested(
                f"with {finished} of {num_batches} batches finished (kept in "
                f"{out_dir / 'batches'}); rerun the same command with --resume to continue"
            )
        if bar is not None:
            count += len(indices) * info.world_size
            bar.update(len(indices) * info.world_size)
            bar.set_postfix(images_per_s=f"{count / (time.perf_counter() - start):.2f}")
    if bar is not None:
        bar.close()
    dist.barrier()
    if not info.is_main:
        return {}
    return write_outputs(run, num_batches)


def write_outputs(run: Run, num_batches: int) -> dict[str, Path]:
    """Assemble the finished batches into the original's .npz, a grid, PNGs and settings JSON."""
    job, out_dir = run.job, run.out_dir
    parts = [np.load(_batch_path(out_dir, k)) for k in range(num_batches)]
    images = np.concatenate([p["images"] for p in parts])
    labels = run.labels
    n, h, w, c = images.shape
    paths = {"npz": out_dir / f"samples_{n}x{h}x{w}x{c}.npz"}
    arrays = {"arr_0": images}
    if run.num_classes is not None:
        arrays["arr_1"] = labels.astype(np.int64)
    _atomic_savez(paths["npz"], **arrays)
    paths["grid"] = out_dir / "grid.png"
    save_grid(images, paths["grid"])
    if job.save_pngs:
        (out_dir / "images").mkdir(exist_ok=True)
        for i, image in enumerate(images):
            with atomic_path(out_dir / "images" / f"{i:06d}.png") as tmp:
                Image.fromarray(image.squeeze(-1) if c == 1 else image).save(tmp, format="PNG")
        paths["images"] = out_dir / "images"
    paths["settings"] = out_dir / "settings.json"
    record = run_record(run)
    atomic_write_text(paths["settings"], json.dumps(record, indent=2, default=str) + "\n")
    return paths


def save_grid(images: np.ndarray, path: Path, columns: int | None = None) -> None:
    """uint8 NHWC images -> one PNG grid with a 2-pixel border."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + 2) + 2, columns * (w + 2) + 2, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[2 + r * (h + 2) : 2 + r * (h + 2) + h, 2 + col * (w + 2) : 2 + col * (w + 2) + w] = (
            image
        )
    with atomic_path(path) as tmp:
        Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(tmp, format="PNG")


def dist_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="sampling")
