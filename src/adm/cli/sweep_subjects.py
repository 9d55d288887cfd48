"""What `adm sweep` samples and how it scores it (`adm.cli.sweep_run.Subject`): the bundled
Fashion-MNIST models scored by the demo's judge (`adm.evaluation.judge`), or any diffusion
checkpoint with a noisy classifier scored by the paper's Inception metrics against a reference
batch (`adm.evaluation.evaluate`, as `adm eval`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adm.cli.sample import classifier_mismatch, prepare_networks
from adm.cli.sweep_run import Subject, SweepSettings
from adm.diffusion.gaussian import Diffusion

REFERENCE_SIZE = 2000  # the judge's reference: test images drawn with seed 0, as in the demo
PR_DRAWS = 10  # precision / recall: mean over this many same-sized reference draws


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def bundled_setup(settings: SweepSettings, weights_dir: Path) -> dict[str, Any]:
    """What must match for rows to be comparable: the three models, samples per cell, the
    judge's reference."""
    from adm.cli import demo

    if settings.per_class * len(settings.classes) > REFERENCE_SIZE:
        raise ValueError(
            f"at most {REFERENCE_SIZE} samples per cell (the judge's reference images), got "
            f"{settings.per_class * len(settings.classes)}"
        )
    digests = {}
    for name in demo.MODELS:
        path = weights_dir / f"{name}.safetensors"
        if not path.is_file():
            raise ValueError(f"demo weights {path} not found (run `adm demo --retrain`)")
        digests[name] = _file_digest(path)
    return {
        "metric": "judge",
        "models": digests,
        "per_class": settings.per_class,
        "classes": list(settings.classes),
        "reference_size": REFERENCE_SIZE,
        "pr_draws": PR_DRAWS,
    }


def bundled_diffusion(weights_dir: Path) -> Diffusion:
    """The bundled diffusion model's schedule, un-respaced (read from the file's metadata)."""
    from adm.models import checkpoint

    path = weights_dir / "fmnist_diffusion.safetensors"
    preset = checkpoint.read_preset(path) if path.is_file() else None
    if preset is None:
        raise ValueError(f"demo weights {path} not found (run `adm demo --retrain`)")
    return Diffusion.from_config(dataclasses.replace(preset.diffusion, timestep_respacing=""))


def bundled_subject(
    settings: SweepSettings,
    weights_dir: Path,
    data_dir: str | None,
    device: torch.device,
    *,
    compile: bool = False,
) -> Subject:
    """The demo's models, scored by its judge against Fashion-MNIST test images (`compile`:
    the diffusion network and classifier under torch.compile)."""
    from adm.cli import demo
    from adm.data import fashion_mnist
    from adm.evaluation.judge import Judge, judge_metrics, judge_reference

    setup = bundled_setup(settings, weights_dir)
    folder = fashion_mnist.find(data_dir)
    models, _ = demo.load_models(weights_dir, device)
    net, classifier = models["fmnist_diffusion"], models["fmnist_classifier"]
    net, classifier = prepare_networks(net, classifier, compile=compile)
    judge = Judge(models["fmnist_judge"])
    test_images, test_labels = fashion_mnist.load(folder, "t10k")
    ref = judge_reference(judge, test_images, test_labels, setup["reference_size"], seed=0)

    def measure(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        draws = min(setup["pr_draws"], setup["reference_size"] // len(images))
        return judge_metrics(judge, images[..., 0], labels, ref, draws, seed=0)

    return Subject(
        model_fn=lambda x, t, **_: net(x, t),
        classifier=classifier,
        diffusion=bundled_diffusion(weights_dir),
        shape=(1, 28, 28),
        measure=measure,
        setup={**setup, "judge_test_accuracy": ref.accuracy},
        device=device,
    )


# ---- any checkpoint: the paper's Inception metrics ----------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointInputs:
    checkpoint: str  # diffusion checkpoint file or released name (as `adm sample --checkpoint`)
    classifier: str | None  # noisy classifier, needed for scales > 0
    ref_batch: str  # reference .npz (arr_0 uint8 NHWC; mu/sigma/mu_s/sigma_s used if stored)
    inception_weights: str | None = None  # default: the cached / downloaded converted graph


@dataclasses.dataclass
class LoadedModels:
    model: torch.nn.Module
    preset: Any
    classifier: torch.nn.Module | None
    num_classes: int
    diffusion: Diffusion


def load_checkpoint_models(
    inputs: CheckpointInputs, device: torch.device, *, compile: bool = False
) -> LoadedModels:
    """The diffusion model and classifier, checked to fit each other (ValueError otherwise);
    `compile`: both under torch.compile."""
    from adm.models import checkpoint

    model, preset = checkpoint.load_model(inputs.checkpoint, device=device)
    if preset.kind != "diffusion":
        raise ValueError(f"--checkpoint {inputs.checkpoint} is a {preset.kind} model")
    classifier, num_classes = None, preset.network.num_classes
    if inputs.classifier:
        classifier, clf = checkpoint.load_model(inputs.classifier, device=device)
        problem = classifier_mismatch(inputs.classifier, clf, preset)
        if problem:
            raise ValueError(problem)
        n = classifier.config.out_channels
        num_classes = n if num_classes is None else min(num_classes, n)
    if num_classes is None:
        raise ValueError("an unconditional model needs --classifier (it names the classes)")
    config = dataclasses.replace(preset.diffusion, timestep_respacing="")
    model, classifier = prepare_networks(model, classifier, compile=compile)
    return LoadedModels(model, preset, classifier, num_classes, Diffusion.from_config(config))


def checkpoint_setup(settings: SweepSettings, inputs: CheckpointInputs) -> dict[str, Any]:
    """What must match for rows to be comparable (files by name and size, not by digest: a
    released checkpoint is gigabytes)."""

    def ident(name: str | None) -> str | None:
        path = Path(name) if name else None
        return f"{path.name}:{path.stat().st_size}" if path and path.is_file() else name

    return {
        "metric": "inception",
        "checkpoint": ident(inputs.checkpoint),
        "classifier": ident(inputs.classifier),
        "ref_batch": ident(inputs.ref_batch),
        "per_class": settings.per_class,
        "classes": list(settings.classes),
    }


def checkpoint_subject(
    settings: SweepSettings,
    inputs: CheckpointInputs,
    models: LoadedModels,
    device: torch.device,
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> Subject:
    """`models` scored like `adm eval`: IS, FID, sFID, precision, recall against `ref_batch`."""
    from adm.diffusion.guidance import unconditional_model_fn
    from adm.evaluation import batches, evaluate, inception

    ref_src = batches.open_npz_batch(inputs.ref_batch)
    if ref_src.n < evaluate.MIN_IMAGES:
        raise ValueError(f"--ref-batch {ref_src.path}: {ref_src.n} images, need >= 4")
    stored = batches.read_reference_stats(ref_src.path)
    net = models.preset.network
    if (ref_src.height, ref_src.width) != (net.image_size, net.image_size):
        raise ValueError(
            f"--ref-batch holds {ref_src.height}x{ref_src.width} images, the model samples "
            f"{net.image_size}x{net.image_size}"
        )
    weights = inception.resolve_weights(inputs.inception_weights)
    inception_net = inception.load_inception(weights, device)
    kw = {"batch_size": batch_size, "use_cache": True, "progress": progress}
    ref = evaluate.load_reference(ref_src, stored, inception_net, **kw)

    def measure(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        feats = evaluate.image_features(images, inception_net, batch_size=batch_size)
        result = evaluate.score(feats, ref, inception_net)
        return {"fid": result.fid, "sfid": result.sfid, "inception_score": result.inception_score,
                "precision": result.precision, "recall": result.recall}  # fmt: skip

    model = models.model
    model_fn = model if net.num_classes is not None else unconditional_model_fn(model)
    setup = checkpoint_setup(settings, inputs)
    setup["inception_weights_sha256"] = inception_net.weights_id
    return Subject(
        model_fn=model_fn,
        classifier=models.classifier,
        diffusion=models.diffusion,
        shape=(net.in_channels, net.image_size, net.image_size),
        measure=measure,
        setup=setup,
        device=device,
    )
