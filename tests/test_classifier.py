"""Noisy classifier: reference logits and guidance gradients, the four pooling heads, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from adm.models import flags
from adm.nets.classifier import ClassifierConfig, NoisyClassifier
from conftest import check_array, golden_cases, load_case, randomize, seeded_noise

CLASSIFIER_CASES = golden_cases("classifier")


def _build(spec: dict) -> torch.nn.Module:
    """The fixture's network from the original class name and constructor kwargs."""
    return flags.build_network(
        spec["class"], flags.config_from_constructor(spec["class"], spec["kwargs"])
    )


def _guidance_grad(model: NoisyClassifier, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """d/dx sum_i log p(y_i | x_i, t_i) (the classifier-guidance gradient, unscaled)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        log_probs = F.log_softmax(model(x, t), dim=-1)  # [N, classes]
        selected = log_probs[torch.arange(len(y)), y]  # [N]
        return torch.autograd.grad(selected.sum(), x)[0]  # [N, C, H, W]


def _tiny(**overrides) -> ClassifierConfig:
    base = dict(
        image_size=16,
        model_channels=32,
        out_channels=5,
        num_res_blocks=1,
        attention_ds=(2,),
        channel_mult=(1, 2),
        num_head_channels=16,
    )
    return ClassifierConfig(**{**base, **overrides})


@pytest.mark.golden
@pytest.mark.parametrize("case", CLASSIFIER_CASES)
def test_classifier_matches_reference(golden_root: Path, case: str) -> None:
    meta, arrays = load_case(golden_root, case)
    assert meta["kind"] == "classifier"
    (spec,) = meta["models"].values()
    assert spec["class"] == "EncoderUNetModel"
    model = _build(spec)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == spec["state_dict_keys"]
    assert sum(p.numel() for p in model.parameters()) == spec["num_parameters"]
    prefix = spec["state_dict_prefix"]
    weights = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
    model.load_state_dict(weights, strict=True)
    model.eval()

    x, t, y = arrays["input/x"], arrays["input/t_classifier"], arrays["input/y"]
    with torch.no_grad():
        check_array(model(x, t), meta, arrays, "output/classifier_logits")
    grad = _guidance_grad(model, x, t, y)
    checked = {"output/classifier_logits"}
    for scale in meta["params"]["scales"]:
        name = f"output/cond_fn_grad/scale_{float(scale)}"
        check_array(grad * scale, meta, arrays, name)
        checked.add(name)
    assert {n for n in arrays if n.startswith(("output/", "debug/"))} == checked


# Released classifiers (spec section 4), counted on the meta device.
RELEASED_CLASSIFIERS = {
    "64x64_classifier": (
        dict(image_size=64, num_res_blocks=4, channel_mult=(1, 2, 3, 4), attention_ds=(2, 4, 8)),
        65_438_568,
    ),
    "128x128_classifier": (
        dict(image_size=128, channel_mult=(1, 1, 2, 3, 4), attention_ds=(4, 8, 16)),
        42_568_040,
    ),
    "256x256_classifier": (
        dict(image_size=256, channel_mult=(1, 1, 2, 2, 4, 4), attention_ds=(8, 16, 32)),
        54_096_360,
    ),
    "512x512_classifier": (
        dict(image_size=512, channel_mult=(0.5, 1, 1, 2, 2, 4, 4), attention_ds=(16, 32, 64)),
        54_448_360,
    ),
}


@pytest.mark.parametrize("name", list(RELEASED_CLASSIFIERS))
def test_released_parameter_counts(name: str) -> None:
    kwargs, expected = RELEASED_CLASSIFIERS[name]
    with torch.device("meta"):
        model = NoisyClassifier(ClassifierConfig(**kwargs))
    assert sum(p.numel() for p in model.parameters()) == expected


def test_released_128_classifier_explicit_config() -> None:
    config = ClassifierConfig(image_size=128, model_channels=128, num_res_blocks=2,
                              channel_mult=(1, 1, 2, 3, 4), attention_ds=(4, 8, 16),
                              num_head_channels=64, out_channels=1000)  # fmt: skip
    with torch.device("meta"):
        model = NoisyClassifier(config)
    assert sum(p.numel() for p in model.parameters()) == 42_568_040
    assert model.out[2].positional_embedding.shape == (512, 8 * 8 + 1)


HEAD_KEYS = {
    "adaptive": ["out.0.weight", "out.0.bias", "out.3.weight", "out.3.bias"],
    "attention": ["out.0.weight", "out.0.bias", "out.2.positional_embedding",
                  "out.2.qkv_proj.weight", "out.2.qkv_proj.bias", "out.2.c_proj.weight",
                  "out.2.c_proj.bias"],
    "spatial": ["out.0.weight", "out.0.bias", "out.2.weight", "out.2.bias"],
    "spatial_v2": ["out.0.weight", "out.0.bias", "out.1.weight", "out.1.bias", "out.3.weight",
                   "out.3.bias"],
}  # fmt: skip


@pytest.mark.parametrize("pool", list(HEAD_KEYS))
def test_pooling_heads(pool: str) -> None:
    config = _tiny(pool=pool)
    model = randomize(NoisyClassifier(config)).eval()
    state = model.state_dict()
    assert [k for k in state if k.startswith("out.")] == HEAD_KEYS[pool]
    assert list(state) == [k for k, _ in model.named_parameters()]  # no buffers
    if pool == "attention":
        # 16 px, two levels -> 8x8 positions + the mean token; 64 channels.
        assert state["out.2.positional_embedding"].shape == (64, 8 * 8 + 1)
        assert model.out[2].num_heads == 64 // 16
    if pool.startswith("spatial"):
        # Means of: input conv 32, level-0 block 32, downsample 32, level-1 block 64, middle 64.
        assert state["out.0.weight"].shape == (2048, 32 + 32 + 32 + 64 + 64)
    x, t = seeded_noise(3, 3, 16, 16), torch.tensor([0, 10, 999])
    with torch.no_grad():
        logits = model(x, t)
        twin = NoisyClassifier(config).eval()
        twin.load_state_dict(state, strict=True)
        assert torch.equal(twin(x, t), logits)
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    assert logits.std() > 0


def test_fresh_adaptive_classifier_outputs_zero() -> None:
    model = NoisyClassifier(_tiny(pool="adaptive")).eval()
    assert torch.count_nonzero(model(seeded_noise(2, 3, 16, 16), torch.tensor([1, 2]))) == 0


def test_attention_pool_rejects_other_resolutions() -> None:
    model = NoisyClassifier(_tiny(pool="attention")).eval()
    with pytest.raises(ValueError, match=r"16x16.*got 32x32"):
        model(seeded_noise(1, 3, 32, 32), torch.tensor([5]))
    # The other heads pool over any size.
    adaptive = randomize(NoisyClassifier(_tiny(pool="adaptive"))).eval()
    assert adaptive(seeded_noise(1, 3, 32, 32), torch.tensor([5])).shape == (1, 5)


def test_guidance_gradient_equals_finite_differences() -> None:
    model = randomize(NoisyClassifier(_tiny(pool="attention")), seed=3).double().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    t, y = torch.tensor([3, 600]), torch.tensor([1, 4])
    direction = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    grad = _guidance_grad(model, x, t, y)

    def objective(z: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(model(z, t), dim=-1)[torch.arange(2), y].sum()

    eps = 1e-5
    with torch.no_grad():
        numeric = (objective(x + eps * direction) - objective(x - eps * direction)) / (2 * eps)
    torch.testing.assert_close((grad * direction).sum(), numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("pool", ["attention", "spatial"])
def test_channels_last_classifier_gives_same_guidance_gradient(pool: str) -> None:
    model = randomize(NoisyClassifier(_tiny(pool=pool)), seed=2).eval()
    fast = NoisyClassifier(model.config).eval()
    fast.load_state_dict(model.state_dict(), strict=True)
    fast.to(memory_format=torch.channels_last)
    x, t, y = seeded_noise(2, 3, 16, 16), torch.tensor([8, 80]), torch.tensor([0, 3])
    with torch.no_grad():
        ref = model(x, t)
        torch.testing.assert_close(fast(x, t), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    ref_grad = _guidance_grad(model, x, t, y)
    torch.testing.assert_close(
        _guidance_grad(fast, x, t, y), ref_grad, rtol=1e-4, atol=1e-5 * float(ref_grad.abs().max())
    )


def test_checkpointing_keeps_classifier_gradients() -> None:
    model = randomize(NoisyClassifier(_tiny()), seed=1).eval()
    ckpt = NoisyClassifier(dataclasses.replace(model.config, use_checkpoint=True)).eval()
    ckpt.load_state_dict(model.state_dict(), strict=True)
    x, t, y = seeded_noise(2, 3, 16, 16), torch.tensor([8, 80]), torch.tensor([0, 3])
    torch.testing.assert_close(
        _guidance_grad(ckpt, x, t, y), _guidance_grad(model, x, t, y), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(pool="max"), "pool must be one of"),
        (dict(pool="attention", num_head_channels=None), "needs num_head_channels"),
        (dict(pool="attention", channel_mult=(1, 3), num_head_channels=64), "not divisible"),
        (dict(model_channels=40), "multiple of 32"),
        (dict(image_size=15), "divisible by 2"),
        (dict(num_res_blocks=-1), "num_res_blocks"),
    ],
)
def test_bad_configs_raise(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _tiny(**overrides)


def test_non_attention_pools_need_no_head_channels() -> None:
    config = _tiny(pool="spatial_v2", num_head_channels=None, num_heads=2)
    model = NoisyClassifier(config).eval()
    assert model(seeded_noise(1, 3, 16, 16), torch.tensor([0])).shape == (1, 5)
