"""Presets: every released checkpoint's config (from the README flag lines), exact parameter
counts on the meta device, strict round trips under the original key names, overrides."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from adm.models.flags import model_and_diffusion_from_flags, parse_flag_line
from adm.models.overrides import apply_overrides
from adm.models.presets import (
    PRESETS,
    RELEASED,
    SamplingSettings,
    build_model,
    get_preset,
    preset_from_dict,
    preset_to_dict,
    state_dict_shapes,
)
from adm.nets.classifier import ClassifierConfig, NoisyClassifier
from adm.nets.unet import SuperResUNet, UNet, UNetConfig

# Spec section 4: counts and key counts from instantiating the original's README flag sets.
RELEASED_COUNTS = {
    "64x64_diffusion": (295_904_454, 541),
    "128x128_diffusion": (421_529_606, 493),
    "256x256_diffusion": (553_838_086, 567),
    "256x256_diffusion_uncond": (552_814_086, 566),
    "512x512_diffusion": (558_997_638, 645),
    "64_256_upsampler": (311_795_910, 567),
    "128_512_upsampler": (308_835_270, 537),
    "lsun_bedroom": (552_814_086, 566),
    "lsun_cat": (552_814_086, 566),
    "lsun_horse": (552_814_086, 566),
    "lsun_horse_nodropout": (552_814_086, 566),
    "64x64_classifier": (65_438_568, 307),
    "128x128_classifier": (42_568_040, 221),
    "256x256_classifier": (54_096_360, 249),
    "512x512_classifier": (54_448_360, 281),
}
TINY = [name for name in PRESETS if name not in RELEASED]  # tests and the CPU demo


def test_all_fifteen_released_presets_and_tiny_ones() -> None:
    assert set(RELEASED) == set(RELEASED_COUNTS)
    assert set(PRESETS) == set(RELEASED) | set(TINY)
    assert {"tiny_diffusion", "tiny_classifier", "tiny_upsampler"} <= set(TINY)
    assert {"fmnist_diffusion", "fmnist_classifier", "fmnist_judge"} <= set(TINY)


@pytest.mark.parametrize("name", list(RELEASED_COUNTS))
def test_parameter_count_and_strict_meta_round_trip(name: str) -> None:
    """Exact counts on the meta device; the original key names and shapes (as meta tensors, no
    weights allocated) load into a fresh network with strict=True."""
    preset = get_preset(name)
    params, keys = RELEASED_COUNTS[name]
    model = build_model(preset, device="meta")
    cls = {"diffusion": UNet, "superres": SuperResUNet, "classifier": NoisyClassifier}[preset.kind]
    assert type(model) is cls
    assert sum(p.numel() for p in model.parameters()) == params
    assert preset.num_parameters == params
    shapes = state_dict_shapes(preset.network, preset.kind)
    assert len(shapes) == keys
    state_dict = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    result = model.load_state_dict(state_dict, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_tiny_weights_round_trip_strictly(name: str) -> None:
    preset = get_preset(name)
    torch.manual_seed(0)
    source = build_model(preset)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    target = build_model(preset)
    target.load_state_dict(source.state_dict(), strict=True)
    expected, loaded = source.state_dict(), target.state_dict()
    assert list(expected) == list(loaded)
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_released_256_layout_matches_the_spec() -> None:
    shapes = state_dict_shapes(get_preset("256x256_diffusion").network, "diffusion")
    assert shapes["label_emb.weight"] == (1000, 1024)
    assert shapes["out.2.weight"] == (6, 256, 3, 3)
    assert shapes["input_blocks.0.0.weight"] == (256, 3, 3, 3)
    assert max(int(k.split(".")[1]) for k in shapes if k.startswith("input_blocks")) == 17
    assert max(int(k.split(".")[1]) for k in shapes if k.startswith("output_blocks")) == 17
    # Attention at ds 8 / 16 / 32 only, 64-channel heads, legacy order: qkv [3C, C, 1].
    assert shapes["input_blocks.10.1.qkv.weight"] == (1536, 512, 1)
    sr = state_dict_shapes(get_preset("64_256_upsampler").network, "superres")
    assert sr["input_blocks.0.0.weight"] == (192, 6, 3, 3)  # x_t and the upsampled low-res image
    clf = state_dict_shapes(get_preset("256x256_classifier").network, "classifier")
    assert clf["out.2.positional_embedding"] == (512, 8 * 8 + 1)  # 128 * 4 channels, 8x8
    assert clf["out.2.c_proj.weight"] == (1000, 512, 1)


@pytest.mark.parametrize("name", list(RELEASED_COUNTS))
def test_released_configs_match_the_spec(name: str) -> None:
    preset = get_preset(name)
    net, diff = preset.network, preset.diffusion
    assert preset.url == f"https://openaipublic.blob.core.windows.net/diffusion/jul-2021/{name}.pt"
    assert diff.steps == 1000
    assert diff.noise_schedule == ("cosine" if name.startswith("64x64") else "linear")
    if preset.kind == "classifier":
        assert isinstance(net, ClassifierConfig)
        assert (net.pool, net.num_head_channels, net.out_channels) == ("attention", 64, 1000)
        assert net.num_res_blocks == (4 if name == "64x64_classifier" else 2)
        assert net.model_channels == 128
        return
    assert diff.var_type == "learned_range" and net.out_channels == 6
    assert net.use_scale_shift_norm and net.resblock_updown
    assert net.dropout == (0.1 if name in ("64x64_diffusion", "lsun_bedroom", "lsun_cat",
                                           "lsun_horse") else 0.0)  # fmt: skip
    assert net.use_new_attention_order == (name == "64x64_diffusion")
    if name in ("128x128_diffusion", "64_256_upsampler"):
        assert (net.num_heads, net.num_head_channels) == (4, None)
    else:
        assert net.num_head_channels == 64
    assert (net.num_classes is None) == (name.endswith("uncond") or name.startswith("lsun"))
    if name == "512x512_diffusion":
        assert net.channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    if preset.kind == "superres":
        assert (preset.small_size, net.image_size) in ((64, 256), (128, 512))
        assert net.attention_ds == ((8, 16, 32) if net.image_size == 256 else (16, 32))


def test_presets_equal_a_fresh_translation_of_the_readme_flags() -> None:
    line = (
        "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
        "--image_size 256 --learn_sigma True --noise_schedule linear --num_channels 256 "
        "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
        "--use_scale_shift_norm True"
    )
    network, diffusion = model_and_diffusion_from_flags(parse_flag_line(line))
    preset = get_preset("256x256_diffusion")
    assert (network, diffusion) == (preset.network, preset.diffusion)


def test_sampling_recipes_follow_the_readme() -> None:
    scales = {"64x64_diffusion": 1.0, "128x128_diffusion": 0.5, "256x256_diffusion": 1.0,
              "256x256_diffusion_uncond": 10.0, "512x512_diffusion": 4.0}  # fmt: skip
    for name, scale in scales.items():
        s = get_preset(name).sampling
        assert (s.steps, s.sampler, s.classifier_scale) == ("250", "ddpm", scale)
        classifier = get_preset(s.classifier)
        assert classifier.kind == "classifier"
        assert classifier.image_size == get_preset(name).image_size
    for name in ("lsun_bedroom", "lsun_cat", "lsun_horse", "lsun_horse_nodropout"):
        assert get_preset(name).sampling.steps == "1000"
    assert get_preset("512x512_diffusion").sampling.precision == "fp32"  # --use_fp16 False
    assert get_preset("256x256_diffusion").sampling.precision == "fp16"
    assert get_preset("lsun_bedroom").paper_fid == pytest.approx(1.90)


@pytest.mark.parametrize("name", list(PRESETS))
def test_json_round_trip(name: str) -> None:
    preset = get_preset(name)
    data = json.loads(json.dumps(preset_to_dict(preset)))
    assert preset_from_dict(data) == preset


def test_build_model_from_bare_configs() -> None:
    assert type(build_model(UNetConfig(image_size=16, model_channels=32), device="meta")) is UNet
    clf = ClassifierConfig(image_size=16, model_channels=32, channel_mult=(1, 2), attention_ds=())
    assert type(build_model(clf, device="meta")) is NoisyClassifier
    with pytest.raises(TypeError):
        build_model("tiny_diffusion")  # type: ignore[arg-type]


def test_get_preset_unknown_names_close_matches() -> None:
    assert get_preset("256x256_diffusion.pt").name == "256x256_diffusion"
    with pytest.raises(ValueError, match="did you mean 256x256_diffusion"):
        get_preset("256x256_difusion")
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("stable_diffusion_xl")


def test_preset_validation() -> None:
    tiny = get_preset("tiny_diffusion")
    with pytest.raises(ValueError, match="kind"):
        dataclasses.replace(tiny, kind="classifier")
    with pytest.raises(ValueError, match="small_size"):
        dataclasses.replace(tiny, small_size=16)
    with pytest.raises(ValueError, match="out_channels 6 does not fit"):
        fixed = dataclasses.replace(tiny.diffusion, var_type="fixed_large")
        dataclasses.replace(tiny, diffusion=fixed)
    with pytest.raises(ValueError, match=r"sampling\.steps"):
        dataclasses.replace(tiny, sampling=SamplingSettings(steps="2000"))
    with pytest.raises(ValueError, match="sampler"):
        SamplingSettings(sampler="euler")  # type: ignore[arg-type]


# ---- overrides -----------------------------------------------------------------------------


def test_set_overrides_are_typed() -> None:
    p = apply_overrides(
        get_preset("256x256_diffusion"),
        ["unet.dropout=0.1", "unet.attention_ds=(4, 8)", "unet.num_classes=none",
         "unet.use_checkpoint=yes", "diffusion.steps=4000", "diffusion.noise_schedule=cosine",
         "sampling.steps=ddim25", "sampling.sampler=ddim", "sampling.classifier_scale=2",
         "paper_fid=none"],
    )  # fmt: skip
    assert p.network.dropout == 0.1 and isinstance(p.network.dropout, float)
    assert p.network.attention_ds == (4, 8)
    assert p.network.num_classes is None and p.network.use_checkpoint is True
    assert (p.diffusion.steps, p.diffusion.noise_schedule) == (4000, "cosine")
    assert (p.sampling.steps, p.sampling.sampler) == ("ddim25", "ddim")
    assert p.sampling.classifier_scale == 2.0
    assert p.paper_fid is None
    assert "label_emb.weight" not in state_dict_shapes(p.network, p.kind)


def test_set_changes_are_validated_together() -> None:
    tiny = get_preset("tiny_diffusion")
    p = apply_overrides(tiny, ["diffusion.var_type=fixed_small", "unet.out_channels=3"])
    assert p.network.out_channels == 3
    wide = apply_overrides(tiny, ["unet.model_channels=64", "unet.channel_mult=0.5,1,2"])
    assert wide.network.channel_mult == (0.5, 1, 2)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("unet.dropout=abc", "expected float"),
        ("unet.dropuot=0.1", "did you mean dropout"),
        ("diffusion.noise_schedule=quadratic", "linear, cosine"),
        ("classifier.dropout=0.0", "write unet.dropout"),
        ("model.dropout=0.0", "unknown section"),
        ("dropout=0.1", "section.field=value"),
        ("unet.dropout", "section.field=value"),
        ("diffusion.var_type=fixed_small", "change both together"),
        ("unet.use_checkpoint=maybe", "boolean"),
        ("unet.model_channels=48", "multiple of 32"),
    ],
)
def test_bad_overrides_say_what_is_wrong(item: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        apply_overrides(get_preset("tiny_diffusion"), [item])


def test_original_flag_lines_apply_on_top_of_a_preset() -> None:
    base = get_preset("256x256_diffusion")
    p = apply_overrides(base, "--image_size 128 --num_heads 4 --num_head_channels -1")
    # The original picks channel_mult by image size and converts attention pixels to factors.
    expected = get_preset("128x128_diffusion").network
    assert p.network == expected
    tokens = "--dropout 0.3 --class_cond=False --timestep_respacing ddim50 --use_ddim True"
    p = apply_overrides(base, [*tokens.split(), "--predict_xstart", "True"])
    assert p.network.dropout == 0.3 and p.network.num_classes is None
    assert (p.sampling.steps, p.sampling.sampler) == ("ddim50", "ddim")
    assert p.diffusion.mean_type == "x0" and p.diffusion.var_type == "learned_range"
    up = apply_overrides(get_preset("64_256_upsampler"), "--large_size 512 --small_size 128 "
                         "--attention_resolutions 32,16 --num_head_channels 64")  # fmt: skip
    assert up.network == get_preset("128_512_upsampler").network and up.small_size == 128


def test_flag_lines_for_classifiers_ignore_model_flags() -> None:
    """The original's classifier_sample.py takes model and classifier flags in one line."""
    clf = apply_overrides(
        get_preset("128x128_classifier"),
        "--num_channels 256 --classifier_depth 3 --classifier_pool adaptive "
        "--noise_schedule cosine",
    )
    assert clf.network.num_res_blocks == 3 and clf.network.pool == "adaptive"
    assert clf.network.model_channels == 128 and clf.diffusion.noise_schedule == "cosine"


def test_flag_errors() -> None:
    tiny = get_preset("tiny_diffusion")
    with pytest.raises(ValueError, match="did you mean --num_channels"):
        apply_overrides(tiny, "--num_chanels 64")
    with pytest.raises(ValueError, match="names a file"):
        apply_overrides(tiny, "--model_path models/x.pt")
    with pytest.raises(ValueError, match="no value"):
        apply_overrides(tiny, "--dropout")
    with pytest.raises(ValueError, match="no default channel_mult"):
        apply_overrides(tiny, "--image_size 48")
