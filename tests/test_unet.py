"""ADM UNet and super-resolution UNet: reference outputs, checkpoint layout, properties, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from adm.models import flags
from adm.nets.unet import (
    AttentionBlock,
    SuperResUNet,
    UNet,
    UNetConfig,
    set_attention_checkpointing,
    upsample_low_res,
)
from conftest import check_array, golden_cases, load_case, randomize, seeded_noise

UNET_CASES = golden_cases("unet_forward")
SUPERRES_CASES = golden_cases("superres")


def _build(spec: dict) -> torch.nn.Module:
    """The fixture's network from the original class name and constructor kwargs."""
    return flags.build_network(
        spec["class"], flags.config_from_constructor(spec["class"], spec["kwargs"])
    )


def _reference_model(meta: dict, arrays: dict) -> UNet:
    """Build the case's network from its constructor kwargs and load its weights strictly."""
    (spec,) = meta["models"].values()
    model = _build(spec)
    prefix = spec["state_dict_prefix"]
    weights = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    model.load_state_dict(weights, strict=True)
    return model.eval()


def _tiny(**overrides) -> UNetConfig:
    base = dict(
        image_size=16,
        model_channels=32,
        num_res_blocks=1,
        attention_ds=(2,),
        channel_mult=(1, 2),
        num_head_channels=16,
    )
    return UNetConfig(**{**base, **overrides})


@pytest.mark.golden
@pytest.mark.parametrize("case", UNET_CASES + SUPERRES_CASES)
def test_state_dict_layout_matches_reference(golden_root: Path, case: str) -> None:
    meta, _ = load_case(golden_root, case)
    (spec,) = meta["models"].values()
    model = _build(spec)
    ours = [[key, list(value.shape)] for key, value in model.state_dict().items()]
    assert ours == spec["state_dict_keys"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    assert [k for k, _ in model.named_parameters()] == list(model.state_dict())  # no buffers


@pytest.mark.golden
@pytest.mark.parametrize("case", UNET_CASES)
def test_unet_forward_matches_reference(golden_root: Path, case: str) -> None:
    meta, arrays = load_case(golden_root, case)
    assert meta["kind"] == "unet_forward"
    model = _reference_model(meta, arrays)
    x, t = arrays["input/x"], arrays["input/t"]
    y = arrays.get("input/y") if model.config.num_classes is not None else None
    taps = {
        "debug/time_embed": model.time_embed,
        "debug/last_input_block": model.input_blocks[-1],
        "debug/middle_block": model.middle_block,
        "debug/first_output_block": model.output_blocks[0],
    }
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: captured.setdefault(name, out))
        for name, module in taps.items()
    ]
    with torch.no_grad():
        out = model(x, t, y)
        for handle in handles:
            handle.remove()
        out_float_t = model(x, arrays["input/t_float"], y)
    check_array(out, meta, arrays, "output/model_output")
    check_array(out_float_t, meta, arrays, "output/model_output_float_t")
    for name, value in captured.items():
        check_array(value, meta, arrays, name)
    expected = {n for n in arrays if n.startswith(("output/", "debug/"))}
    assert expected == {"output/model_output", "output/model_output_float_t", *taps}


@pytest.mark.golden
@pytest.mark.parametrize("case", SUPERRES_CASES)
def test_superres_forward_matches_reference(golden_root: Path, case: str) -> None:
    meta, arrays = load_case(golden_root, case)
    model = _reference_model(meta, arrays)
    assert isinstance(model, SuperResUNet)
    x, low_res = arrays["input/x"], arrays["input/low_res"]
    y = arrays.get("input/y") if model.config.num_classes is not None else None
    check_array(upsample_low_res(low_res, x.shape[-2:]), meta, arrays, "debug/low_res_upsampled")
    with torch.no_grad():
        out = model(x, arrays["input/t"], low_res, y)
    check_array(out, meta, arrays, "output/model_output")


# Released checkpoints (spec section 4): flags translated by hand, counted on the meta device.
_RELEASED = dict(out_channels=6, use_scale_shift_norm=True, resblock_updown=True)
RELEASED_UNETS = {
    "64x64_diffusion": (
        UNet,
        dict(image_size=64, model_channels=192, num_res_blocks=3, attention_ds=(2, 4, 8),
             channel_mult=(1, 2, 3, 4), num_classes=1000, num_head_channels=64,
             use_new_attention_order=True, dropout=0.1),
        295_904_454,
    ),
    "128x128_diffusion": (
        UNet,
        dict(image_size=128, model_channels=256, num_res_blocks=2, attention_ds=(4, 8, 16),
             channel_mult=(1, 1, 2, 3, 4), num_classes=1000, num_heads=4),
        421_529_606,
    ),
    "256x256_diffusion": (
        UNet,
        dict(image_size=256, model_channels=256, num_res_blocks=2, attention_ds=(8, 16, 32),
             channel_mult=(1, 1, 2, 2, 4, 4), num_classes=1000, num_head_channels=64),
        553_838_086,
    ),
    "256x256_diffusion_uncond": (
        UNet,
        dict(image_size=256, model_channels=256, num_res_blocks=2, attention_ds=(8, 16, 32),
             channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64),
        552_814_086,
    ),
    "512x512_diffusion": (
        UNet,
        dict(image_size=512, model_channels=256, num_res_blocks=2, attention_ds=(16, 32, 64),
             channel_mult=(0.5, 1, 1, 2, 2, 4, 4), num_classes=1000, num_head_channels=64),
        558_997_638,
    ),
    "64_256_upsampler": (
        SuperResUNet,
        dict(image_size=256, model_channels=192, num_res_blocks=2, attention_ds=(8, 16, 32),
             channel_mult=(1, 1, 2, 2, 4, 4), num_classes=1000, num_heads=4),
        311_795_910,
    ),
    "128_512_upsampler": (
        SuperResUNet,
        dict(image_size=512, model_channels=192, num_res_blocks=2, attention_ds=(16, 32),
             channel_mult=(1, 1, 2, 2, 4, 4), num_classes=1000, num_head_channels=64),
        308_835_270,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(RELEASED_UNETS))
def test_released_parameter_counts(name: str) -> None:
    cls, kwargs, expected = RELEASED_UNETS[name]
    with torch.device("meta"):
        model = cls(UNetConfig(**_RELEASED, **kwargs))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_fresh_unet_outputs_exactly_zero() -> None:
    model = UNet(_tiny(num_classes=10, out_channels=6)).eval()
    out = model(seeded_noise(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 9]))
    assert out.shape == (2, 6, 16, 16)
    assert torch.count_nonzero(out) == 0


def test_fractional_channel_mult() -> None:
    config = UNetConfig(image_size=32, model_channels=64, channel_mult=[0.5, 1, 1, 2],
                        attention_ds=[4], num_res_blocks=1, num_head_channels=32)  # fmt: skip
    assert config.channel_mult == (0.5, 1, 1, 2) and config.attention_ds == (4,)
    model = randomize(UNet(config)).eval()
    assert model.input_blocks[0][0].out_channels == 32 and model.out[2].in_channels == 32
    assert model.middle_block[0].in_layers[2].out_channels == 128
    with torch.no_grad():
        out = model(seeded_noise(1, 3, 32, 32), torch.tensor([10]))
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def _twin_outputs(a: UNetConfig, b: UNetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of two configs with identical weights on the same input."""
    first = randomize(UNet(a)).eval()
    second = UNet(b).eval()
    second.load_state_dict(first.state_dict(), strict=True)
    x, t = seeded_noise(2, 3, 16, 16, seed=1), torch.tensor([5, 500])
    with torch.no_grad():
        return first(x, t), second(x, t)


def test_head_order_matters_only_with_several_heads() -> None:
    legacy, new = _twin_outputs(_tiny(), _tiny(use_new_attention_order=True))
    assert (legacy - new).abs().max() > 1e-3
    one_legacy, one_new = _twin_outputs(
        _tiny(num_head_channels=None), _tiny(num_head_channels=None, use_new_attention_order=True)
    )
    assert torch.equal(one_legacy, one_new)


def test_channels_last_input_gives_same_output() -> None:
    model = randomize(UNet(_tiny(num_classes=4, resblock_updown=True))).eval()
    x, t, y = seeded_noise(2, 3, 16, 16), torch.tensor([1, 900]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = model(x, t, y)
        out = model(x.to(memory_format=torch.channels_last), t, y)
        model_cl = model.to(memory_format=torch.channels_last)
        out_cl = model_cl(x.to(memory_format=torch.channels_last), t, y)
    # Different conv algorithms for the two layouts: equal up to float32 rounding (a layout bug
    # would differ by O(1)).
    atol = 1e-4 * float(ref.abs().max())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol)
    torch.testing.assert_close(out_cl, ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("new_order", [False, True])
def test_channels_last_model_gives_same_outputs_and_gradients(new_order: bool) -> None:
    config = _tiny(
        num_classes=4, resblock_updown=True, use_scale_shift_norm=True, num_head_channels=None,
        num_heads=2, use_new_attention_order=new_order,
    )  # fmt: skip
    plain = randomize(UNet(config)).train()
    fast = UNet(config).train()
    fast.load_state_dict(plain.state_dict(), strict=True)
    fast.to(memory_format=torch.channels_last)
    layouts = []
    fast.output_blocks[-1][0].in_layers[2].register_forward_hook(
        lambda _m, args, _o: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last)
        )
    )
    x, t, y = seeded_noise(2, 3, 16, 16), torch.tensor([1, 900]), torch.tensor([0, 3])
    results = []
    for model in (plain, fast):
        xi = x.clone().requires_grad_(True)  # contiguous input: the model converts it once
        out = model(xi, t, y)
        out.square().mean().backward()
        results.append((out, xi.grad, *(p.grad for p in model.parameters())))
    assert layouts == [True]  # really ran in channels_last inside
    assert results[1][0].is_contiguous()  # and hands back a plain NCHW tensor
    for ref, got in zip(*results, strict=True):
        # Different conv kernels per layout: equal up to float32 rounding (the floor covers the
        # biases that feed a GroupNorm, whose true gradient is zero).
        atol = max(1e-5 * float(ref.detach().abs().max()), 1e-7)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=atol)


def _assert_same_training_gradients(plain: UNet, ckpt: UNet) -> None:
    """One fwd+bwd of both models on the same input: input and weight gradients agree."""
    x, t = seeded_noise(2, 3, 16, 16), torch.tensor([2, 800])
    grads = []
    for model in (plain, ckpt):
        xi = x.clone().requires_grad_(True)
        model(xi, t).square().mean().backward()
        grads.append([xi.grad, *(p.grad for p in model.parameters())])
    for g_plain, g_ckpt in zip(*grads, strict=True):
        torch.testing.assert_close(g_ckpt, g_plain, rtol=1e-6, atol=1e-7)


def test_attention_checkpointing_recomputes_only_attention() -> None:
    plain = randomize(UNet(_tiny(dropout=0.0, use_scale_shift_norm=True))).train()
    ckpt = UNet(plain.config).train()
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    assert set_attention_checkpointing(ckpt) is ckpt
    calls: list[str] = []
    attn = next(m for m in ckpt.modules() if isinstance(m, AttentionBlock))
    attn.norm.register_forward_hook(lambda *_: calls.append("attention"))
    ckpt.middle_block[0].in_layers[2].register_forward_hook(lambda *_: calls.append("res"))
    _assert_same_training_gradients(plain, ckpt)
    assert calls.count("attention") == 2 and calls.count("res") == 1
    set_attention_checkpointing(ckpt, False)
    calls.clear()
    ckpt(seeded_noise(1, 3, 16, 16), torch.tensor([5])).sum().backward()
    assert calls.count("attention") == 1


def test_gradient_checkpointing_gives_identical_gradients() -> None:
    plain = randomize(UNet(_tiny(dropout=0.0, use_scale_shift_norm=True))).train()
    ckpt = UNet(dataclasses.replace(plain.config, use_checkpoint=True)).train()
    ckpt.load_state_dict(plain.state_dict(), strict=True)
    calls = []
    ckpt.middle_block[0].in_layers[2].register_forward_hook(lambda *_: calls.append(1))
    _assert_same_training_gradients(plain, ckpt)
    assert len(calls) == 2  # the checkpointed block really ran again in backward
    with torch.no_grad():
        calls.clear()
        ckpt(seeded_noise(2, 3, 16, 16), torch.tensor([2, 800]))
    assert len(calls) == 1  # no checkpointing without autograd


def test_timestep_forms() -> None:
    model = randomize(UNet(_tiny())).eval()
    x = seeded_noise(2, 3, 16, 16)
    with torch.no_grad():
        ints = model(x, torch.tensor([7, 7]))
        assert torch.equal(model(x, torch.tensor([7.0, 7.0])), ints)
        assert torch.equal(model(x, torch.tensor(7)), ints)
        assert not torch.equal(model(x, torch.tensor([7.5, 7.5])), ints)


def test_label_errors() -> None:
    x, t = seeded_noise(2, 3, 16, 16), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="unconditional"):
        UNet(_tiny())(x, t, torch.tensor([0, 1]))
    conditional = UNet(_tiny(num_classes=10))
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(x, t)
    with pytest.raises(ValueError, match="shape"):
        conditional(x, t, torch.tensor([1]))
    with pytest.raises(ValueError, match="shape"):
        conditional(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(model_channels=48), "multiple of 32"),
        (dict(channel_mult=(0.5, 1)), "multiple of 32"),
        (dict(channel_mult=()), "at least one level"),
        (dict(image_size=18, channel_mult=(1, 1, 1)), "divisible by 2"),
        (dict(num_head_channels=24), "num_head_channels"),
        (dict(num_head_channels=None, num_heads=3), "3 heads"),
        (dict(num_head_channels=None, num_heads_upsample=5), "5 heads"),
        (dict(num_head_channels=0), "num_head_channels"),
        (dict(image_size=0), "image_size"),
        (dict(out_channels=0), "out_channels"),
        (dict(num_classes=0), "num_classes"),
        (dict(attention_ds=(0,)), "attention_ds"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_configs_raise(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny(**overrides)


def test_config_is_frozen_and_hashable() -> None:
    config = _tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.image_size = 32  # type: ignore[misc]
    assert hash(config) == hash(_tiny(attention_ds=[2], channel_mult=[1, 2]))


def test_superres_concatenates_upsampled_low_res() -> None:
    config = _tiny(num_classes=3, out_channels=6)
    model = randomize(SuperResUNet(config)).eval()
    assert model.input_blocks[0][0].in_channels == 6
    plain = UNet(dataclasses.replace(config, in_channels=6)).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    x, low_res = seeded_noise(2, 3, 16, 16), seeded_noise(2, 3, 8, 8, seed=1)
    t, y = torch.tensor([4, 40]), torch.tensor([0, 2])
    up = upsample_low_res(low_res, (16, 16))
    assert up.shape == (2, 3, 16, 16)
    assert torch.equal(upsample_low_res(x, (16, 16)), x)
    with torch.no_grad():
        out = model(x, t, low_res, y)
        assert torch.equal(out, plain(torch.cat([x, up], dim=1), t, y))
    assert out.shape == (2, 6, 16, 16)
