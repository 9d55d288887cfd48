"""Network primitives: timestep embedding, float32 GroupNorm, zero init, both head orders."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adm.nets.nn import (
    Conv1x1,
    GroupNorm32,
    normalization,
    pointwise,
    qkv_attention,
    timestep_embedding,
    token_attention,
    upsample_nearest2x,
    zero_module,
)
from conftest import check_array, golden_cases, load_case


def _einsum_attention(qkv: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """Attention written the long way: scaled q.k, float32 softmax over keys, weighted sum of v."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    else:
        q, k, v = (part.reshape(b * heads, ch, length) for part in qkv.chunk(3, dim=1))
    weight = torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch)
    weight = torch.softmax(weight.float(), dim=-1).to(qkv.dtype)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(b, heads * ch, length)


@pytest.mark.golden
@pytest.mark.parametrize("case", golden_cases("primitives"))
def test_primitives_match_reference(golden_root: Path, case: str) -> None:
    meta, arrays = load_case(golden_root, case)
    assert meta["kind"] == "primitives"
    checked = set()
    t = arrays["input/timesteps"]
    for dim in meta["params"]["emb_dims"]:
        for max_period in meta["params"]["max_periods"]:
            name = f"output/timestep_embedding/dim{dim}_maxperiod{max_period}"
            emb = timestep_embedding(t, dim, max_period=max_period)
            assert emb.dtype == torch.float32
            check_array(emb, meta, arrays, name)
            checked.add(name)
    heads = meta["params"]["n_heads"]
    for legacy, name in [
        (False, "output/qkv_attention_new_order"),
        (True, "output/qkv_attention_legacy"),
    ]:
        check_array(qkv_attention(arrays["input/qkv"], heads, legacy=legacy), meta, arrays, name)
        checked.add(name)
    # Every network-primitive output of the case is checked (the others belong to the diffusion).
    outputs = {n for n in arrays if n.startswith("output/")}
    assert {n for n in outputs if "timestep_embedding" in n or "qkv_attention" in n} == checked


def test_timestep_embedding_layout() -> None:
    t = torch.tensor([0, 3, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    # t = 0: cos(0) = 1 first, sin(0) = 0 second.
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4, dtype=torch.float32) / 4)
    torch.testing.assert_close(emb[1, :4], torch.cos(3 * freqs))
    torch.testing.assert_close(emb[1, 4:], torch.sin(3 * freqs))
    odd = timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, -1], torch.zeros(3))
    assert torch.equal(odd[:, :8], emb)
    # Integer and integral float timesteps give the same embedding; fractions are honoured.
    assert torch.equal(timestep_embedding(t.float(), 8), emb)
    assert not torch.equal(
        timestep_embedding(torch.tensor([2.5]), 8), timestep_embedding(t[1:2], 8)
    )


def test_group_norm32_computes_in_float32() -> None:
    norm = normalization(64)
    assert isinstance(norm, GroupNorm32) and norm.num_groups == 32 and norm.eps == 1e-5
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 64, 4, 4) * 30 + 7).bfloat16()
    ref = torch.nn.functional.group_norm(x.float(), 32, norm.weight, norm.bias, 1e-5)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref.bfloat16())
    assert torch.equal(norm(x.float()), ref)
    assert norm(x.double()).dtype == torch.float64


def test_zero_module() -> None:
    conv = torch.nn.Conv2d(4, 4, 3)
    assert zero_module(conv) is conv
    assert all(torch.count_nonzero(p) == 0 for p in conv.parameters())


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    ch=st.sampled_from([1, 4, 8, 16]),
    length=st.integers(1, 20),
    legacy=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_qkv_attention_equals_einsum(batch, heads, ch, length, legacy, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, 3 * heads * ch, length, generator=gen)
    out = qkv_attention(qkv, heads, legacy=legacy)
    assert out.shape == (batch, heads * ch, length)
    torch.testing.assert_close(out, _einsum_attention(qkv, heads, legacy), rtol=1e-5, atol=1e-5)


def test_qkv_head_orders() -> None:
    qkv = torch.randn(2, 3 * 4 * 8, 10)
    # One head: both layouts read [q | k | v].
    one = torch.randn(2, 3 * 8, 10)
    assert torch.equal(qkv_attention(one, 1, legacy=True), qkv_attention(one, 1, legacy=False))
    # Several heads: the layouts differ, and the result differs.
    diff = qkv_attention(qkv, 4, legacy=True) - qkv_attention(qkv, 4, legacy=False)
    assert diff.abs().max() > 1e-2


def test_qkv_attention_dtype_and_errors() -> None:
    qkv = torch.randn(2, 48, 16)
    out = qkv_attention(qkv.bfloat16(), 2, legacy=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), qkv_attention(qkv, 2, legacy=True), rtol=0.05, atol=0.05
    )
    with pytest.raises(ValueError, match="divisible"):
        qkv_attention(torch.randn(1, 50, 4), 2, legacy=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("modulated", [True, False])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_norm_silu_equals_norm_then_scale_shift_then_silu(dtype, modulated, layout) -> None:
    """Both memory formats: per-sample gains take a different kernel call in each."""
    norm = normalization(64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
        norm.bias.copy_(torch.randn(64))
    x = torch.randn(2, 64, 5, 5).to(memory_format=layout).to(dtype)
    scale, shift = torch.randn(2, 64, 1, 1, dtype=dtype), torch.randn(2, 64, 1, 1, dtype=dtype)
    out = norm.silu(x, scale, shift) if modulated else norm.silu(x)
    assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    ref = norm(x.to(wide))
    if modulated:
        ref = ref * (1 + scale.to(wide)) + shift.to(wide)
    ref = torch.nn.functional.silu(ref)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.to(wide), ref, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="both scale and shift"):
        norm.silu(x, scale, None)
    strided = torch.randn(2, 128, 5, 5, dtype=dtype)[:, ::2]  # neither layout: copied once
    ref = torch.nn.functional.silu(norm(strided.contiguous()).to(wide))
    torch.testing.assert_close(norm.silu(strided).to(wide), ref, rtol=tol, atol=tol)


def test_norm_silu_without_affine_parameters() -> None:
    norm = GroupNorm32(8, 16, affine=False)
    x = torch.randn(2, 16, 3, 3)
    scale, shift = torch.randn(2, 16, 1, 1), torch.randn(2, 16, 1, 1)
    silu = torch.nn.functional.silu
    torch.testing.assert_close(norm.silu(x), silu(norm(x)))
    torch.testing.assert_close(norm.silu(x, scale, shift), silu(norm(x) * (1 + scale) + shift))
    tokens = torch.randn(2, 16, 7)  # [N, C, L]: any spatial rank
    torch.testing.assert_close(norm.silu(tokens), silu(norm(tokens)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_norm_silu_gradients(channels_last: bool) -> None:
    """The hand-written backward against finite differences (float64), for the input, the
    affine parameters and a per-sample scale and shift, in both memory formats."""
    torch.manual_seed(0)
    norm = normalization(64).double()
    x = torch.randn(2, 64, 2, 3, dtype=torch.float64) * 2 + 1  # offset: exercises the mean terms
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    scale = torch.randn(2, 64, 1, 1, dtype=torch.float64)
    shift = torch.randn(2, 64, 1, 1, dtype=torch.float64)
    inputs = (x, scale, shift, norm.weight, norm.bias)
    for t in inputs:
        t.requires_grad_(True)

    def modulated(x, scale, shift, weight, bias):
        return norm.silu(x, scale, shift)

    def plain(x, scale, shift, weight, bias):
        return norm.silu(x)

    # the full Jacobian (fast_mode's random projections missed a 1% error in dx); a small input
    # keeps it quick: the Jacobian of [3, 64, 4, 5] took 20 s per memory format
    assert torch.autograd.gradcheck(modulated, inputs)
    assert torch.autograd.gradcheck(plain, inputs)


def test_norm_silu_keeps_only_its_input_for_backward() -> None:
    """The fused function's point: one activation-sized tensor saved, not four."""
    norm = normalization(64)
    x = torch.randn(2, 64, 16, 16, requires_grad=True)
    big: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= x.numel():
            big.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = norm.silu(x, torch.randn(2, 64, 1, 1), torch.randn(2, 64, 1, 1))
    assert big == [x.untyped_storage().data_ptr()]
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda x: x,  # NCHW: the two-copy function
        lambda x: x.to(memory_format=torch.channels_last),  # interpolate
        lambda x: x[:, :, :, ::2],  # strided: interpolate
    ],
)
def test_upsample_nearest2x_is_interpolate(make) -> None:
    """The same values as `F.interpolate(mode="nearest")` and the same gradient (the 2x2 sums
    may add in another order), for any layout and a non-contiguous incoming gradient."""
    x = make(torch.randn(2, 3, 5, 8))
    ref = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    out = upsample_nearest2x(x)
    assert out.shape == ref.shape and torch.equal(out, ref)
    grad = torch.randn(2, 3, 10, ref.shape[3] * 2)[..., ::2]  # strided, as a slice's gradient
    a, b = x.detach().requires_grad_(), x.detach().requires_grad_()
    torch.nn.functional.interpolate(a, scale_factor=2, mode="nearest").backward(grad)
    upsample_nearest2x(b).backward(grad)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-6)
    x64 = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(upsample_nearest2x, (x64,))
    assert torch.autograd.gradgradcheck(upsample_nearest2x, (x64,))


@pytest.mark.parametrize("batch", [1, 3])  # 3: the batched matmul when autograd records
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_is_the_conv1d(batch: int, bias: bool) -> None:
    """Values and gradients of the 1x1 Conv1d, for strided (an NCHW activation's) and dense
    tokens, with autograd recording and without."""
    conv = torch.nn.Conv1d(8, 24, 1, bias=bias)
    x = torch.randn(batch, 8, 7)  # [B, C, L]
    grad = torch.randn(batch, 24, 7)
    for tokens in (x.transpose(1, 2), x.transpose(1, 2).contiguous()):
        with torch.no_grad():
            out = pointwise(tokens, conv)
        torch.testing.assert_close(out, conv(x).transpose(1, 2), rtol=1e-5, atol=1e-6)
        a = tokens.detach().requires_grad_()
        conv.zero_grad()
        pointwise(a, conv).backward(grad.transpose(1, 2))  # a strided gradient, as in the UNet
        ours = [a.grad] + [p.grad.clone() for p in conv.parameters()]
        b = x.detach().requires_grad_()
        conv.zero_grad()
        conv(b).backward(grad)
        ref = [b.grad.transpose(1, 2)] + [p.grad for p in conv.parameters()]
        for u, v in zip(ours, ref, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transposed", [True, False])  # an NCHW activation's tokens; dense
def test_pointwise_gradients_keep_their_inputs_layout(transposed: bool) -> None:
    """In training (batch > 1 on the CPU) the tokens' gradient comes back in the tokens' own
    strides, so an NCHW producer gets an NCHW gradient, and the weight's gradient in the
    parameter's layout; second derivatives work (float64 gradcheck and gradgradcheck)."""
    conv = torch.nn.Conv1d(5, 6, 1).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)  # [B, C, L]
    tokens = x.transpose(1, 2) if transposed else x.transpose(1, 2).contiguous()
    out = pointwise(tokens, conv)
    d_tokens, d_weight = torch.autograd.grad(out, (tokens, conv.weight), torch.randn_like(out))
    assert d_tokens.stride() == tokens.stride()
    assert d_weight.is_contiguous() and d_weight.shape == conv.weight.shape

    def f(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        c = torch.nn.Conv1d(5, 6, 1).double()
        del c.weight, c.bias
        c.weight, c.bias = w, b
        return pointwise(t.transpose(1, 2) if transposed else t, c)

    t = x.detach().requires_grad_() if transposed else tokens.detach().requires_grad_()
    w = conv.weight.detach().requires_grad_()
    b = conv.bias.detach().requires_grad_()
    assert torch.autograd.gradcheck(f, (t, w, b))
    assert torch.autograd.gradgradcheck(f, (t, w, b))


@pytest.mark.parametrize(
    "layout",
    [torch.contiguous_format, torch.channels_last],  # the batched matmul; the conv
)
@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1_is_the_1x1_convolution(layout, bias: bool) -> None:
    conv = Conv1x1(6, 4)
    if not bias:
        conv.bias = None
    assert list(conv.state_dict()) == (["weight", "bias"] if bias else ["weight"])
    x = torch.randn(2, 6, 5, 3).to(memory_format=layout).requires_grad_()
    grad = torch.randn(2, 4, 5, 3)
    out = conv(x)
    out.backward(grad)
    ours = [x.grad] + [p.grad for p in conv.parameters()]
    ref_x = x.detach().requires_grad_()
    ref_w = conv.weight.detach().requires_grad_()
    ref_b = None if conv.bias is None else conv.bias.detach().requires_grad_()
    ref = torch.nn.functional.conv2d(ref_x, ref_w, ref_b)
    ref.backward(grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    refs = [ref_x.grad, ref_w.grad] + ([] if ref_b is None else [ref_b.grad])
    for u, v in zip(ours, refs, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("legacy", [True, False])
def test_token_attention_matches_and_reads_first_queries(legacy: bool) -> None:
    qkv = torch.randn(2, 3 * 3 * 8, 11)  # [B, 3HC, L], 3 heads of 8 channels
    tokens = qkv.transpose(1, 2).contiguous()  # [B, L, 3HC]
    full = token_attention(tokens, 3, legacy=legacy)
    torch.testing.assert_close(full.transpose(1, 2), _einsum_attention(qkv, 3, legacy))
    first = token_attention(tokens, 3, legacy=legacy, queries=1)
    assert first.shape == (2, 1, 24)
    torch.testing.assert_close(first, full[:, :1], rtol=1e-5, atol=1e-6)
