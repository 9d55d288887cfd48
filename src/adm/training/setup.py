"""Resolving a training run before any weights exist: typed options, data sources, classes.

`prepare(preset, data, run_dir, config)` lists the data (all ranks list it identically), checks
labels against the network (class-conditional UNets, classifiers, the classifier-free null
label), optionally fits the network's class count to the data, and returns a `RunSetup` that
`--dry-run` prints and `adm.training.loop.train` runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from adm.data import datasets as datalib
from adm.diffusion.resample import SamplerName
from adm.diffusion.schedule import space_timesteps
from adm.models.presets import Preset, num_outputs, preset_to_dict, with_outputs

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (the original's image_train / classifier_train / super_res_train flags).

    `batch_size` is GLOBAL (all ranks together; the original's is per rank) and `microbatch` the
    largest number of images per forward/backward on one rank (None: the whole local batch).
    Gradients of micro-batches are AVERAGED (the original sums per-micro-batch means).
    """

    steps: int
    batch_size: int = 8
    microbatch: int | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    anneal_lr: bool = False  # lr·(1 − step/steps), the original's lr_anneal_steps / anneal_lr
    ema_rates: tuple[float, ...] = (0.9999,)
    timestep_sampler: SamplerName = "uniform"
    precision: Precision = "auto"
    grad_clip: float | None = None
    label_dropout: float = 0.0  # classifier-free guidance training: P(label -> null label)
    noised: bool = True  # classifier: train on x_t (True) or clean images (False, t = 0)
    random_crop: bool = False
    random_flip: bool = True
    max_nonfinite: int = 5  # stop after this many consecutive steps with a non-finite loss
    seed: int = 0
    log_interval: int = 10
    save_interval: int = 1000
    keep: int = 3
    sample_interval: int = 0  # EMA sample grid every N steps (0: only at the end when > 0 steps)
    sample_steps: str = "ddim25"
    num_samples: int = 16
    eval_interval: int = 100  # classifier: held-out top-1/top-5 every N steps
    eval_size: int = 512
    workers: int = 0
    skip_bad_images: bool = False
    device: str | None = None
    progress: bool = True
    compile: bool = False  # torch.compile the network (first step compiles; docs/speed.md)
    checkpoint_attention: bool = False  # recompute attention in backward (less memory)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ema_rates", tuple(float(r) for r in self.ema_rates))
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.microbatch is None or self.microbatch >= 1, "microbatch must be >= 1"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr}"),
            (
                math.isfinite(self.weight_decay) and self.weight_decay >= 0,
                f"weight decay must be a finite number >= 0, got {self.weight_decay}",
            ),
            (all(0 <= r < 1 for r in self.ema_rates), "EMA rates must lie in [0, 1)"),
            (0 <= self.label_dropout < 1, "label dropout must lie in [0, 1)"),
            (
                self.grad_clip is None or (math.isfinite(self.grad_clip) and self.grad_clip > 0),
                f"grad clip must be a positive finite number, got {self.grad_clip}",
            ),
            (self.max_nonfinite >= 1, "max_nonfinite must be >= 1"),
            (
                min(self.log_interval, self.save_interval, self.eval_interval) >= 1,
                "log, save and eval intervals must be >= 1",
            ),
            (self.keep >= 1, "keep must be >= 1"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"), f"bad precision {self.precision}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class DataSpec:
    """Where the images come from and how they are labelled."""

    path: str
    labels: datalib.LabelRule = "filename"
    val_path: str | None = None  # classifier: held-out images (else a split of `path`)
    val_fraction: float = 0.1
    fit_classes: bool = False  # resize the label embedding / classifier head to the data


@dataclass
class RunSetup:
    """Everything resolved for one run: what `--dry-run` prints."""

    preset: Preset
    config: TrainConfig
    data: DataSpec
    run_dir: Path
    source: datalib.Source
    val_source: datalib.Source | None = None
    class_names: tuple[str, ...] = ()
    null_label: int | None = None
    init_from: str | None = None
    notes: list[str] = field(default_factory=list)
    force_resume: bool = False  # continue a run whose identity differs (`adm train --force`)

    def class_map(self) -> dict[str, Any]:
        return {
            "class_names": list(self.class_names),
            "null_label": self.null_label,
            "labels": self.data.labels,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "preset": preset_to_dict(self.preset),
            "train": dataclasses.asdict(self.config),
            "data": {
                **dataclasses.asdict(self.data),
                "items": len(self.source),
                "fingerprint": data_fingerprint(self.source),
                "held_out_items": len(self.val_source) if self.val_source is not None else 0,
                **self.class_map(),
            },
            "run_dir": str(self.run_dir),
            "init_from": self.init_from,
            "notes": self.notes,
        }


# What makes a run that run: a resume whose values differ is refused (`Trainer`), naming each.
# --steps, --lr and --anneal-lr follow the LR rules of `adm.training.lr`; intervals, workers,
# progress and the device may change freely.
IDENTITY = {
    "train": ("batch_size", "weight_decay", "timestep_sampler", "precision", "grad_clip",
              "label_dropout", "noised", "random_crop", "random_flip", "seed"),
    "data": ("items", "fingerprint", "held_out_items", "class_names", "labels", "null_label"),
}  # fmt: skip


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """ "train.seed: 0 -> 1" for each identity value of two `describe()`s that differs (a value
    the old one lacks, written by an older adm, is not compared)."""
    out = []
    new = json.loads(json.dumps(new, default=str))  # as written to config.json: lists, not tuples
    for section, keys in IDENTITY.items():
        a, b = old.get(section, {}), new.get(section, {})
        for key in keys:
            if key in a and a[key] != b.get(key):
                out.append(f"{section}.{key}: {_short(a[key])} -> {_short(b.get(key))}")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 24 else text[:21] + "..."


def data_fingerprint(source: datalib.Source) -> str:
    """16 hex digits of SHA-256 over the image names and labels in order: another file list, a
    relabelled class or reordered data give another fingerprint (the pixels are not read)."""
    digest = hashlib.sha256()
    for i in range(len(source)):
        digest.update(source.name(i).encode() + b"\0")
    if source.labels is not None:
        digest.update(np.asarray(source.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def _remap(source: datalib.Source, names: tuple[str, ...], origin: str) -> None:
    """Re-index the source's labels by a class list fixed elsewhere (a fine-tuned checkpoint)."""
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(source.class_names) - set(index))
    if unknown:
        raise datalib.DataError(f"classes {unknown[:5]} are not in the class map of {origin}")
    lookup = [index[n] for n in source.class_names]
    source.labels = np.asarray(lookup, dtype=np.int64)[source.labels]
    source.class_names = names


def prepare(
    preset: Preset,
    data: DataSpec,
    run_dir: str | Path,
    config: TrainConfig,
    *,
    init_from: str | None = None,
    init_classes: tuple[str, ...] | None = None,
) -> RunSetup:
    """Open the data, check labels against the network, and resolve the class map."""
    cond = preset.kind == "classifier" or preset.network.num_classes is not None
    wants_cond = cond or data.fit_classes
    source = datalib.open_source(data.path, labelled=wants_cond, rule=data.labels)
    if config.sample_interval and preset.kind != "classifier":
        try:
            space_timesteps(preset.diffusion.steps, config.sample_steps)
        except ValueError as err:
            raise ValueError(f"--sample-steps: {err}") from None
    if config.label_dropout and preset.kind == "classifier":
        raise ValueError("label dropout is for diffusion models, not classifiers")
    if config.label_dropout and not wants_cond:
        raise ValueError("label dropout needs a class-conditional model (unet.num_classes)")
    setup = RunSetup(preset, config, data, Path(run_dir), source, init_from=init_from)
    if wants_cond:
        datalib.check_conditional(source)
        if init_classes:
            _remap(source, init_classes, init_from or "the checkpoint")
    if preset.kind == "classifier":
        setup.val_source = _held_out(setup)
        source = setup.source
    if not wants_cond:
        return setup
    needed = len(source.class_names) + (1 if config.label_dropout else 0)
    if data.fit_classes and num_outputs(preset) != needed:
        if init_from:
            raise ValueError("--fit-classes cannot resize a network loaded from a checkpoint")
        setup.preset = preset = with_outputs(preset, needed)
        setup.notes.append(f"network resized to {needed} classes to fit the data")
    outputs = num_outputs(preset)
    if outputs is None or needed > outputs:
        raise datalib.DataError(
            f"the data has {len(source.class_names)} classes"
            + (" plus the null label" if config.label_dropout else "")
            + f" but the network has {outputs} outputs; pass --fit-classes or --set "
            + ("classifier.out_channels" if preset.kind == "classifier" else "unet.num_classes")
        )
    setup.class_names = source.class_names
    # Classifier-free guidance: the network's LAST label row is the null label.
    setup.null_label = outputs - 1 if config.label_dropout else None
    if setup.null_label is not None:  # saved with the weights: sampling then knows it
        sampling = dataclasses.replace(preset.sampling, null_label=setup.null_label)
        setup.preset = dataclasses.replace(preset, sampling=sampling)
    return setup


def _held_out(setup: RunSetup) -> datalib.Source:
    data, cfg = setup.data, setup.config
    if data.val_path:
        val = datalib.open_source(data.val_path, labelled=True, rule=data.labels, split="t10k")
        _remap(val, setup.source.class_names, data.path)
        return val
    train, val = datalib.split_held_out(setup.source, data.val_fraction, seed=cfg.seed)
    setup.source = train
    setup.notes.append(f"held out {len(val)} of {len(train) + len(val)} items for evaluation")
    return val


def load_class_map(checkpoint: str | Path) -> dict[str, Any] | None:
    """The `classes.json` saved next to a checkpoint of a run, if any."""
    path = Path(checkpoint).with_name("classes.json")
    return json.loads(path.read_text()) if path.is_file() else None
