"""The plain-PyTorch DINOv2 ViT against transformers' `Dinov2Model` with the same random weights
(float32 roundoff), its official key names, the exact preprocessing, FD-DINOv2 end to end on a
tiny configuration (the same code path as ViT-L/14), its feature cache and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adm.cli import main as cli
from adm.evaluation import dinov2, evaluate, features, metrics
from adm.evaluation.dinov2 import DINOv2, ViTConfig
from adm.evaluation.weights import WeightsError

TINY = ViTConfig(embed_dim=32, depth=2, num_heads=4, mlp_ratio=4, img_size=56, input_size=28)


def _tiny(seed: int = 0, cfg: ViTConfig = TINY) -> DINOv2:
    model = DINOv2(cfg)
    model.load_official(dinov2.random_state_dict(cfg, seed))
    return model.eval().requires_grad_(False)


def _to_transformers(state: dict, cfg: ViTConfig, pos_embed: torch.Tensor | None = None):
    """transformers' Dinov2Model holding the same weights (qkv split into query/key/value)."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Dinov2Config(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio, patch_size=cfg.patch_size, image_size=cfg.img_size,
        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False,
    )  # fmt: skip
    if pos_embed is not None:  # a table for another native grid
        hf_cfg.image_size = int(((pos_embed.shape[1] - 1) ** 0.5) * cfg.patch_size)
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": state["mask_token"],
        "embeddings.position_embeddings": state["pos_embed"] if pos_embed is None else pos_embed,
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    model = transformers.Dinov2Model(hf_cfg).eval()
    new_names = "encoder.layer.0.attention.q_proj.weight" in model.state_dict()  # >= 5.0
    q_k_v_o = (
        ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj")
        if new_names
        else ("attention.attention.query", "attention.attention.key",
              "attention.attention.value", "attention.output.dense")
    )  # fmt: skip
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for name in ("weight", "bias"):
            q, k, v = state[ours + f"attn.qkv.{name}"].chunk(3)
            for part, t in zip(q_k_v_o[:3], (q, k, v), strict=True):
                out[theirs + f"{part}.{name}"] = t
            out[theirs + f"{q_k_v_o[3]}.{name}"] = state[ours + f"attn.proj.{name}"]
            for sub in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[theirs + f"{sub}.{name}"] = state[ours + f"{sub}.{name}"]
        out[theirs + "layer_scale1.lambda1"] = state[ours + "ls1.gamma"]
        out[theirs + "layer_scale2.lambda1"] = state[ours + "ls2.gamma"]
    model.load_state_dict(out, strict=True)
    return model


def _agree(cfg: ViTConfig, size: int, batch: int = 2) -> None:
    state = dinov2.random_state_dict(cfg, seed=1)
    ours = DINOv2(cfg).eval()
    ours.load_official(state)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        pos = ours.interpolate_pos_encoding(size, size)
        peer = _to_transformers(state, cfg, pos if size != cfg.img_size else None)
        got, want = ours.features(x), peer(pixel_values=x).pooler_output
    assert got.shape == (batch, cfg.embed_dim)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float32 roundoff


@pytest.mark.parametrize("size", [56, 28, 42])
def test_forward_agrees_with_transformers(size) -> None:
    """At the native grid the whole forward is compared; at other sizes transformers is given
    our interpolated position table as its native one (it resizes to a target size, not by the
    original's scale factor: `test_position_table_follows_the_original`)."""
    _agree(TINY, size)


@pytest.mark.slow
def test_vit_l14_agrees_with_transformers_at_224() -> None:
    _agree(dinov2.VITL14, 224, batch=1)


def test_position_table_follows_the_original() -> None:
    model = _tiny()
    pos = model.pos_embed
    assert model.interpolate_pos_encoding(56, 56) is pos  # native grid: unchanged
    table = model.interpolate_pos_encoding(28, 28)  # 4x4 -> 2x2 patches
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    by_scale = torch.nn.functional.interpolate(grid, scale_factor=2.1 / 4, mode="bicubic")
    by_size = torch.nn.functional.interpolate(grid, size=(2, 2), mode="bicubic")
    assert torch.equal(table[0, 0], pos[0, 0])
    torch.testing.assert_close(table[0, 1:], by_scale.flatten(2)[0].T, rtol=0, atol=0)
    assert not torch.allclose(by_scale, by_size, atol=1e-4)  # the two conventions differ


def test_official_key_names_and_shapes() -> None:
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DINOv2().state_dict().items()}
    assert len(shapes) == 5 + 24 * 14 + 2
    assert shapes["pos_embed"] == (1, 1 + 37 * 37, 1024) and shapes["mask_token"] == (1, 1024)
    assert shapes["patch_embed.proj.weight"] == (1024, 3, 14, 14)
    assert shapes["blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert shapes["blocks.0.mlp.fc1.weight"] == (4096, 1024) and shapes["blocks.0.ls1.gamma"] == (
        1024,
    )
    assert shapes["norm.weight"] == (1024,) and not any(k.startswith("head") for k in shapes)


def test_strict_load_names_what_is_wrong() -> None:
    state = dinov2.random_state_dict(TINY)
    del state["blocks.1.ls2.gamma"]
    with pytest.raises(WeightsError, match=r"1 missing keys \['blocks.1.ls2.gamma'\]"):
        DINOv2(TINY).load_official(state)
    state = dinov2.random_state_dict(TINY)
    state["pos_embed"] = state["pos_embed"][:, :5]
    with pytest.raises(WeightsError, match="weights key pos_embed: shape"):
        DINOv2(TINY).load_official(state)


def test_preprocess_is_bicubic_224_and_imagenet_normalization() -> None:
    images = torch.full((1, 224, 224, 3), 255, dtype=torch.uint8)
    x = DINOv2.preprocess(images)
    want = (1 - torch.tensor(dinov2.IMAGENET_MEAN)) / torch.tensor(dinov2.IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 100, 100], want)
    small = torch.randint(0, 256, (2, 32, 48, 3), dtype=torch.uint8)
    resized = torch.nn.functional.interpolate(
        small.permute(0, 3, 1, 2).float(), size=(224, 224), mode="bicubic", antialias=True
    )
    mean = torch.tensor(dinov2.IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(dinov2.IMAGENET_STD).reshape(1, 3, 1, 1)
    torch.testing.assert_close(DINOv2.preprocess(small), (resized / 255 - mean) / std)


def test_fd_dinov2_end_to_end_with_its_own_cache(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    ref, sample = tmp_path / "ref.npz", tmp_path / "sample.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8))
    np.savez(sample, arr_0=rng.integers(0, 256, (5, 24, 16, 3), dtype=np.uint8))
    model = _tiny()
    model.weights_id = "tiny-random-0"
    kw = {"metrics": ("fd_dinov2",), "dinov2": model, "progress": False}
    result = evaluate.evaluate(ref, sample, None, **kw)
    with torch.inference_mode():
        feats = {
            name: model(torch.from_numpy(np.load(path)["arr_0"])).numpy()
            for name, path in (("ref", ref), ("sample", sample))
        }
    expected = metrics.frechet_distance(
        metrics.compute_statistics(feats["sample"]), metrics.compute_statistics(feats["ref"])
    )
    assert result.fd_dinov2 == pytest.approx(expected, rel=1e-6) and result.fid is None
    assert len(list(tmp_path.glob("*.adm-features-*.npz"))) == 2
    monkeypatch.setattr(features, "extract_dinov2", None)  # would fail if called
    assert evaluate.evaluate(ref, sample, None, **kw).fd_dinov2 == result.fd_dinov2
    other = _tiny(seed=5)  # other weights: the cache must not serve the first network's features
    other.weights_id = "tiny-random-5"
    with pytest.raises(TypeError):
        evaluate.evaluate(ref, sample, None, **{**kw, "dinov2": other})


def test_fd_dinov2_without_weights_is_one_line(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ADM_CACHE_DIR", str(tmp_path / "adm"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    batch = tmp_path / "b.npz"
    np.savez(batch, arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    code = cli.main(["eval", str(batch), str(batch), "--metrics", "fd_dinov2"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("adm eval: error: DINOv2 weights not found: download ")
    assert f"put it at {tmp_path / 'adm' / 'dinov2_vitl14_pretrain.pth'}" in err
    assert "--dinov2-weights PATH" in err


def test_adm_stats_writes_dinov2_statistics_in_the_same_pass(tmp_path) -> None:
    from adm.evaluation import batches, inception

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", arr_0=images)
    net = inception.InceptionV3()
    net.load_converted(inception.random_state_dict(0))
    vit = _tiny()
    out = evaluate.build_reference_batch(
        batches.open_npz_batch(tmp_path / "b.npz"), tmp_path / "ref.npz", net.eval(),
        num_images=3, batch_size=2, progress=False, dinov2=vit,
    )  # fmt: skip
    with np.load(out) as ref, torch.inference_mode():
        assert set(ref.files) == {"arr_0", "mu", "sigma", "mu_s", "sigma_s", "mu_dinov2",
                                  "sigma_dinov2"}  # fmt: skip
        want = metrics.compute_statistics(vit(torch.from_numpy(images)).numpy())
        np.testing.assert_allclose(ref["mu_dinov2"], want.mu, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(ref["sigma_dinov2"], want.sigma, rtol=1e-5, atol=1e-7)
        assert ref["mu"].shape == (2048,) and ref["arr_0"].shape == (3, 20, 20, 3)


def test_fd_dinov2_between_statistics_files_needs_no_network(tmp_path) -> None:
    rng = np.random.default_rng(2)
    paths, diag = [], []
    for name in ("ref", "sample"):
        d = rng.uniform(0.1, 2.0, 1024)
        np.savez(tmp_path / f"{name}.npz", mu_dinov2=np.zeros(1024) + (name == "sample"),
                 sigma_dinov2=np.diag(d))  # fmt: skip
        paths.append(tmp_path / f"{name}.npz")
        diag.append(d)
    result = evaluate.evaluate(*paths, None, metrics=("fd_dinov2",))
    expected = 1024 + np.sum((np.sqrt(diag[0]) - np.sqrt(diag[1])) ** 2)  # ‖Δμ‖² + Σ(√a − √b)²
    assert result.fd_dinov2 == pytest.approx(expected, rel=1e-9)
    assert result.stats_from_file == {"ref": ["fd_dinov2"], "sample": ["fd_dinov2"]}
