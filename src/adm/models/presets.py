"""Every released checkpoint of Dhariwal & Nichol 2021 as a typed preset, plus tiny CPU presets.

A `Preset` bundles the network config, the diffusion config, the README's sampling recipe and the
paper's FID. The released configs are written once, as the README's flag lines, and translated by
`adm.models.flags`; `adm.models.overrides.apply_overrides` changes any field (`unet.dropout=0.0`)
or pastes flag lines on top.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, get_args

import torch
from torch import nn

from adm._util.runtime import Precision
from adm.diffusion.gaussian import DiffusionConfig
from adm.diffusion.schedule import space_timesteps
from adm.models.flags import (
    classifier_from_flags,
    diffusion_from_flags,
    parse_flag_line,
    superres_from_flags,
    unet_from_flags,
)
from adm.nets.classifier import ClassifierConfig, NoisyClassifier
from adm.nets.unet import SuperResUNet, UNet, UNetConfig

__all__ = [
    "PRESETS",
    "RELEASED",
    "RELEASE_URL",
    "Kind",
    "NetworkConfig",
    "Preset",
    "Sampler",
    "SamplingSettings",
    "build_model",
    "get_preset",
    "num_parameters",
    "preset_from_dict",
    "preset_json",
    "preset_to_dict",
    "state_dict_shapes",
]

Kind = Literal["diffusion", "superres", "classifier"]
Sampler = Literal["ddpm", "ddim", "dpm++2m"]
NetworkConfig = UNetConfig | ClassifierConfig

RELEASE_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"


@dataclass(frozen=True)
class SamplingSettings:
    """A recommended sampling recipe (the README's SAMPLE_FLAGS and classifier_sample flags).

    `steps` is a respacing string ("250", "ddim25"); `classifier` names a classifier preset;
    `precision` is what the original sampled in (`use_fp16`), applied with torch.amp on CUDA only.
    """

    steps: str = "250"
    sampler: Sampler = "ddpm"
    classifier: str | None = None
    classifier_scale: float = 0.0
    batch_size: int = 4
    num_samples: int = 50_000  # the paper's FID sample count
    eta: float = 0.0
    clip_denoised: bool = True
    precision: Precision = "fp32"
    # A model trained with label dropout (classifier-free guidance) reads this label as "no
    # label": it is not a class to sample, and the default null label of --cfg-scale.
    null_label: int | None = None

    def __post_init__(self) -> None:
        _check_choice("sampling.sampler", self.sampler, Sampler)
        _check_choice("sampling.precision", self.precision, Precision)
        if self.batch_size < 1 or self.num_samples < 1:
            raise ValueError("sampling.batch_size and sampling.num_samples must be positive")
        if self.null_label is not None and self.null_label < 0:
            raise ValueError(f"sampling.null_label must be >= 0, got {self.null_label}")


@dataclass(frozen=True)
class Preset:
    """A named network + diffusion + recommended sampling; keyed by the checkpoint's file stem."""

    name: str
    kind: Kind
    network: NetworkConfig
    diffusion: DiffusionConfig
    small_size: int | None = None  # super-resolution: the low-resolution input size
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    paper_fid: float | None = None
    url: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, Kind)
        if (self.kind == "classifier") != isinstance(self.network, ClassifierConfig):
            raise ValueError(
                f"preset kind {self.kind!r} does not fit a {type(self.network).__name__}"
            )
        if (self.kind == "superres") != (self.small_size is not None):
            raise ValueError("small_size is set for super-resolution presets and only for them")
        if self.small_size is not None and not 0 < self.small_size < self.network.image_size:
            raise ValueError(
                f"small_size {self.small_size} must lie between 0 and image_size "
                f"{self.network.image_size}"
            )
        null, classes = self.sampling.null_label, getattr(self.network, "num_classes", None)
        if null is not None and (self.kind == "classifier" or null >= (classes or 0)):
            raise ValueError(
                f"sampling.null_label {null} needs a class-conditional model with more than "
                f"{null} classes"
            )
        if self.kind != "classifier":
            expected = self.network.in_channels * (2 if self.diffusion.learn_sigma else 1)
            if self.network.out_channels != expected:
                raise ValueError(
                    f"out_channels {self.network.out_channels} does not fit var_type "
                    f"{self.diffusion.var_type!r} with {self.network.in_channels} image channels "
                    f"(expected {expected}); change both together"
                )
        try:
            space_timesteps(self.diffusion.steps, self.sampling.steps)
        except ValueError as err:
            raise ValueError(f"sampling.steps: {err}") from None

    @property
    def image_size(self) -> int:
        return self.network.image_size

    @property
    def num_parameters(self) -> int:
        """Exact parameter count (counted on the meta device, nothing allocated)."""
        return num_parameters(self.network, self.kind)


def _check_choice(name: str, value: Any, literal: Any) -> None:
    if value not in get_args(literal):
        raise ValueError(f"{name} must be one of {', '.join(get_args(literal))}; got {value!r}")


# ---- building networks --------------------------------------------------------------------------

_NETWORK_CLASSES: dict[str, type[nn.Module]] = {
    "diffusion": UNet,
    "superres": SuperResUNet,
    "classifier": NoisyClassifier,
}


def build_model(
    preset_or_config: Preset | NetworkConfig, *, device: torch.device | str | None = None
) -> nn.Module:
    """`UNet`, `SuperResUNet` or `NoisyClassifier` for a preset (a bare `UNetConfig` gives a
    `UNet`). Weights are freshly initialised; `device="meta"` allocates nothing."""
    if isinstance(preset_or_config, Preset):
        config, kind = preset_or_config.network, preset_or_config.kind
    elif isinstance(preset_or_config, (UNetConfig, ClassifierConfig)):
        config = preset_or_config
        kind = "classifier" if isinstance(config, ClassifierConfig) else "diffusion"
    else:
        raise TypeError(
            f"expected a Preset, UNetConfig or ClassifierConfig, got {preset_or_config!r}"
        )
    return _build(config, kind, device)


def _build(config: NetworkConfig, kind: str, device: torch.device | str | None) -> nn.Module:
    if device is None:
        return _NETWORK_CLASSES[kind](config)
    with torch.device(device):
        return _NETWORK_CLASSES[kind](config)


@lru_cache(maxsize=64)
def state_dict_shapes(
    config: NetworkConfig, kind: Kind = "diffusion"
) -> dict[str, tuple[int, ...]]:
    """Original key -> shape of the network's state dict, in order (built on the meta device)."""
    model = _build(config, kind, "meta")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def num_outputs(preset: Preset) -> int | None:
    """The number of labels a network knows: a classifier's logits, a conditional UNet's label
    embedding rows (None: unconditional)."""
    net = preset.network
    return net.out_channels if preset.kind == "classifier" else net.num_classes


def with_outputs(preset: Preset, n: int) -> Preset:
    """`preset` with its label count set to `n` (what training's `--fit-classes` does)."""
    field_name = "out_channels" if preset.kind == "classifier" else "num_classes"
    network = dataclasses.replace(preset.network, **{field_name: n})
    return dataclasses.replace(preset, network=network)


def num_parameters(config: NetworkConfig, kind: Kind = "diffusion") -> int:
    """Exact parameter count of a network (the state dict holds parameters only, no buffers)."""
    return sum(_numel(shape) for shape in state_dict_shapes(config, kind).values())


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


# ---- the released checkpoints: the README's flag lines, verbatim -------------------------------

_IMAGENET_256 = (
    "--attention_resolutions 32,16,8 --class_cond {cond} --diffusion_steps 1000 {dropout}"
    "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
    "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
    "--use_scale_shift_norm True"
)
_CLASSIFIER = (
    "--image_size {size} --classifier_attention_resolutions 32,16,8 --classifier_depth {depth} "
    "--classifier_width 128 --classifier_pool attention --classifier_resblock_updown True "
    "--classifier_use_scale_shift_norm True"
)
_LSUN = _IMAGENET_256.format(cond="False", dropout="--dropout {dropout} ")

# name -> (kind, flag line, sampling, paper FID, description)
_RELEASED: dict[str, tuple[Kind, str, SamplingSettings, float | None, str]] = {
    "64x64_diffusion": (
        "diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 "
        "--image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 "
        "--num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
        "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
        SamplingSettings(classifier="64x64_classifier", classifier_scale=1.0, precision="fp16"),
        2.07,
        "ImageNet 64x64, class-conditional, cosine schedule",
    ),
    "128x128_diffusion": (
        "diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 "
        "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True",
        SamplingSettings(classifier="128x128_classifier", classifier_scale=0.5, precision="fp16"),
        2.97,
        "ImageNet 128x128, class-conditional",
    ),
    "256x256_diffusion": (
        "diffusion",
        _IMAGENET_256.format(cond="True", dropout=""),
        SamplingSettings(classifier="256x256_classifier", classifier_scale=1.0, precision="fp16"),
        4.59,
        "ImageNet 256x256, class-conditional",
    ),
    "256x256_diffusion_uncond": (
        "diffusion",
        _IMAGENET_256.format(cond="False", dropout=""),
        SamplingSettings(classifier="256x256_classifier", classifier_scale=10.0, precision="fp16"),
        None,
        "ImageNet 256x256, unconditional (guided by the 256x256 classifier at scale 10)",
    ),
    "512x512_diffusion": (
        "diffusion",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--image_size 512 --learn_sigma True --noise_schedule linear --num_channels 256 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 False "
        "--use_scale_shift_norm True",
        SamplingSettings(classifier="512x512_classifier", classifier_scale=4.0),
        7.72,
        "ImageNet 512x512, class-conditional (channel_mult 0.5,1,1,2,2,4,4)",
    ),
    "64_256_upsampler": (
        "superres",
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--large_size 256  --small_size 64 --learn_sigma True --noise_schedule linear "
        "--num_channels 192 --num_heads 4 --num_res_blocks 2 --resblock_updown True "
        "--use_fp16 True --use_scale_shift_norm True",
        SamplingSettings(precision="fp16"),
        3.94,
        "ImageNet 64 -> 256 upsampler (FID with a guided 64x64 base model)",
    ),
    "128_512_upsampler": (
        "superres",
        "--attention_resolutions 32,16 --class_cond True --diffusion_steps 1000 --large_size 512 "
        "--small_size 128 --learn_sigma True --noise_schedule linear --num_channels 192 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True",
        SamplingSettings(precision="fp16"),
        3.85,
        "ImageNet 128 -> 512 upsampler (FID with a guided 128x128 base model)",
    ),
    "lsun_bedroom": (
        "diffusion",
        _LSUN.format(dropout="0.1"),
        SamplingSettings(steps="1000", precision="fp16"),
        1.90,
        "LSUN bedroom 256x256, unconditional",
    ),
    "lsun_cat": (
        "diffusion",
        _LSUN.format(dropout="0.1"),
        SamplingSettings(steps="1000", precision="fp16"),
        5.57,
        "LSUN cat 256x256, unconditional",
    ),
    "lsun_horse": (
        "diffusion",
        _LSUN.format(dropout="0.1"),
        SamplingSettings(steps="1000", precision="fp16"),
        2.57,
        "LSUN horse 256x256, unconditional",
    ),
    "lsun_horse_nodropout": (
        "diffusion",
        _LSUN.format(dropout="0.0"),
        SamplingSettings(steps="1000", precision="fp16"),
        None,
        "LSUN horse 256x256, unconditional, trained without dropout",
    ),
    # The classifiers' noise schedule only matters for training them; 64x64 is assumed to use its
    # diffusion model's cosine schedule (the README gives no classifier diffusion flags).
    "64x64_classifier": (
        "classifier",
        _CLASSIFIER.format(size=64, depth=4) + " --noise_schedule cosine",
        SamplingSettings(),
        None,
        "noisy ImageNet classifier for guiding 64x64_diffusion",
    ),
    "128x128_classifier": (
        "classifier",
        _CLASSIFIER.format(size=128, depth=2),
        SamplingSettings(),
        None,
        "noisy ImageNet classifier for guiding 128x128_diffusion",
    ),
    "256x256_classifier": (
        "classifier",
        _CLASSIFIER.format(size=256, depth=2),
        SamplingSettings(),
        None,
        "noisy ImageNet classifier for guiding the 256x256 models",
    ),
    "512x512_classifier": (
        "classifier",
        _CLASSIFIER.format(size=512, depth=2),
        SamplingSettings(),
        None,
        "noisy ImageNet classifier for guiding 512x512_diffusion",
    ),
}


def _released(name: str) -> Preset:
    kind, line, sampling, fid, description = _RELEASED[name]
    flags = parse_flag_line(line)
    network: NetworkConfig
    small_size = None
    if kind == "classifier":
        network = classifier_from_flags(flags)
    elif kind == "superres":
        network, small_size = superres_from_flags(flags)
    else:
        network = unet_from_flags(flags)
    return Preset(
        name=name,
        kind=kind,
        network=network,
        diffusion=diffusion_from_flags(flags),
        small_size=small_size,
        sampling=sampling,
        paper_fid=fid,
        url=RELEASE_URL + name + ".pt",
        description=description,
    )


# ---- tiny presets for tests and CPU demos (not released; random or self-trained weights) ------

_TINY_UNET = dict(
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    num_classes=1000,
    num_head_channels=32,
    use_scale_shift_norm=True,
    resblock_updown=True,
)
_TINY_DIFFUSION = DiffusionConfig(steps=1000, noise_schedule="linear", var_type="learned_range")
_TINY: dict[str, Preset] = {
    "tiny_diffusion": Preset(
        name="tiny_diffusion",
        kind="diffusion",
        network=UNetConfig(image_size=32, channel_mult=(1, 2, 2), attention_ds=(4,), **_TINY_UNET),
        diffusion=_TINY_DIFFUSION,
        sampling=SamplingSettings(
            steps="ddim25", sampler="ddim", classifier="tiny_classifier", classifier_scale=1.0
        ),
        description="32x32 class-conditional ADM in miniature, for tests and CPU demos",
    ),
    "tiny_upsampler": Preset(
        name="tiny_upsampler",
        kind="superres",
        network=UNetConfig(image_size=32, channel_mult=(1, 2), attention_ds=(2,), **_TINY_UNET),
        diffusion=_TINY_DIFFUSION,
        small_size=16,
        sampling=SamplingSettings(steps="ddim25", sampler="ddim"),
        description="16 -> 32 super-resolution ADM in miniature, for tests and CPU demos",
    ),
    "tiny_classifier": Preset(
        name="tiny_classifier",
        kind="classifier",
        network=ClassifierConfig(
            image_size=32,
            model_channels=32,
            num_res_blocks=1,
            channel_mult=(1, 2, 2),
            attention_ds=(2, 4),
            num_head_channels=32,
        ),
        diffusion=DiffusionConfig(steps=1000, noise_schedule="linear"),
        description="32x32 noisy classifier in miniature, for tests and CPU demos",
    ),
}

# ---- the demo: the paper in miniature on Fashion-MNIST (28x28 grey, 10 classes), CPU-sized -----

_FMNIST_DIFFUSION = DiffusionConfig(
    steps=1000, noise_schedule="cosine", var_type="learned_range", loss_type="rescaled_mse"
)
_FMNIST_NET = dict(image_size=28, in_channels=1, model_channels=32, channel_mult=(1, 2, 2))
_DEMO: dict[str, Preset] = {
    "fmnist_diffusion": Preset(
        name="fmnist_diffusion",
        kind="diffusion",
        network=UNetConfig(
            **_FMNIST_NET,
            out_channels=2,
            num_res_blocks=1,
            attention_ds=(4,),
            num_head_channels=32,
            use_scale_shift_norm=True,
            resblock_updown=True,
        ),
        diffusion=_FMNIST_DIFFUSION,
        sampling=SamplingSettings(
            steps="ddim25",
            sampler="ddim",
            classifier="fmnist_classifier",
            classifier_scale=4.0,
            batch_size=50,
        ),
        description="Fashion-MNIST 28x28 unconditional ADM (learned sigma, cosine) for adm demo",
    ),
    "fmnist_classifier": Preset(
        name="fmnist_classifier",
        kind="classifier",
        network=ClassifierConfig(
            **_FMNIST_NET,
            out_channels=10,
            num_res_blocks=1,
            attention_ds=(4,),
            num_head_channels=32,
            pool="attention",
        ),
        diffusion=_FMNIST_DIFFUSION,
        description="noisy Fashion-MNIST classifier (attention pool) that guides fmnist_diffusion",
    ),
    "fmnist_judge": Preset(
        name="fmnist_judge",
        kind="classifier",
        network=ClassifierConfig(
            **_FMNIST_NET,
            out_channels=10,
            num_res_blocks=1,
            attention_ds=(),
            num_head_channels=None,
            pool="spatial",
        ),
        diffusion=_FMNIST_DIFFUSION,
        description="clean-image Fashion-MNIST classifier: adm demo's stand-in for Inception",
    ),
}

PRESETS: dict[str, Preset] = {
    **{name: _released(name) for name in _RELEASED},
    **_TINY,
    **_DEMO,
}
RELEASED = tuple(_RELEASED)


def get_preset(name: str) -> Preset:
    """The preset called `name` (a released file stem such as "256x256_diffusion", or a tiny one).

    A trailing ".pt" / ".safetensors" is ignored; unknown names raise ValueError with close names.
    """
    stem = name.removesuffix(".pt").removesuffix(".safetensors")
    if stem in PRESETS:
        return PRESETS[stem]
    close = difflib.get_close_matches(stem, list(PRESETS), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown preset {name!r}{hint} (`adm presets` lists all {len(PRESETS)})")


# ---- serialisation (the safetensors metadata of adm checkpoints) -------------------------------

PRESET_FORMAT = 1


def preset_to_dict(preset: Preset) -> dict[str, Any]:
    """A JSON-able dict holding the fully resolved preset (tuples become lists)."""
    out = dataclasses.asdict(preset)
    out["network"]["class"] = type(preset.network).__name__
    return {"format": PRESET_FORMAT, **out}


def preset_from_dict(data: dict[str, Any]) -> Preset:
    """Inverse of `preset_to_dict`; raises ValueError for missing, unknown or invalid fields."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    data = dict(data)
    if data.pop("format", None) != PRESET_FORMAT:
        raise ValueError(f"unsupported adm config format (expected format {PRESET_FORMAT})")
    try:
        network = dict(data.pop("network"))
        cls = {"UNetConfig": UNetConfig, "ClassifierConfig": ClassifierConfig}[network.pop("class")]
        return Preset(
            network=cls(**network),
            diffusion=DiffusionConfig(**data.pop("diffusion")),
            sampling=SamplingSettings(**data.pop("sampling")),
            **data,
        )
    except (KeyError, TypeError) as err:
        raise ValueError(f"invalid adm config: {err!r}") from None


def preset_json(preset: Preset) -> str:
    return json.dumps(preset_to_dict(preset), sort_keys=True)
