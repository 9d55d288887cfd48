"""Closed-form and structural tests of the evaluation suite: metrics (FID, IS, precision/recall),
the Inception port with random weights, weights download over loopback HTTP, npz streaming."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from adm._util.atomic import atomic_path
from adm.evaluation import batches, inception
from adm.evaluation.inception import InceptionV3, WeightsError
from adm.evaluation.metrics import (
    GaussianStats,
    StatsAccumulator,
    compute_statistics,
    distance_block,
    frechet_distance,
    inception_score,
    inception_score_splits,
    manifold_radii,
    precision_recall,
)

# --------------------------------------------------------------------------- statistics and FID


def _random_stats(rng: np.random.Generator, d: int = 16, n: int = 200) -> GaussianStats:
    return compute_statistics(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3)


def test_statistics_match_numpy_cov_and_chunking() -> None:
    x = np.random.default_rng(0).standard_normal((1000, 20)).astype(np.float32) * 5 + 100
    stats = compute_statistics(x, chunk=97)
    np.testing.assert_allclose(stats.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-10)
    acc = StatsAccumulator()
    for part in np.array_split(x, 7):
        acc.update(torch.from_numpy(part))
    np.testing.assert_allclose(acc.finalize().sigma, stats.sigma, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="at least 2"):
        compute_statistics(x[:1])


def test_frechet_of_identical_statistics_is_zero() -> None:
    stats = _random_stats(np.random.default_rng(1))
    assert abs(frechet_distance(stats, stats)) < 1e-8 * np.trace(stats.sigma)


def test_frechet_with_equal_covariances_is_squared_mean_distance() -> None:
    rng = np.random.default_rng(2)
    a = _random_stats(rng)
    b = GaussianStats(a.mu + rng.standard_normal(a.mu.shape), a.sigma)
    expected = float(np.sum((a.mu - b.mu) ** 2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_matches_sqrtm_and_one_dimensional_closed_form() -> None:
    rng = np.random.default_rng(3)
    a, b = _random_stats(rng), _random_stats(rng)
    covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
    ref = np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma + b.sigma - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-9)
    one = GaussianStats(np.array([1.0]), np.array([[4.0]]))
    two = GaussianStats(np.array([-2.0]), np.array([[9.0]]))
    assert frechet_distance(one, two) == pytest.approx(9 + (2 - 3) ** 2)  # Δμ² + (σ1 − σ2)²


def test_frechet_rejects_mismatched_or_non_finite_statistics() -> None:
    a = _random_stats(np.random.default_rng(4), d=4)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(a, _random_stats(np.random.default_rng(4), d=5))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(a, GaussianStats(a.mu, a.sigma * np.nan))


# --------------------------------------------------------------------------- Inception Score


def test_inception_score_of_uniform_predictions_is_one() -> None:
    assert inception_score(np.zeros((37, 1008)), split_size=10) == pytest.approx(1.0, abs=1e-12)


def test_inception_score_of_confident_distinct_classes_is_their_number() -> None:
    logits = np.full((12, 1008), -1e4)  # softmax underflows to exact zeros: no NaN here
    logits[np.arange(12), np.arange(12)] = 0
    splits = inception_score_splits(logits, split_size=5)  # 5 + 5 + 2 rows, consecutive
    np.testing.assert_allclose(splits, [5, 5, 2], rtol=1e-12)
    assert inception_score(logits, split_size=5) == pytest.approx(4.0)
    assert inception_score(logits) == pytest.approx(12.0)  # default 5000: one split


# --------------------------------------------------------------------------- precision / recall


def _brute_force_pr(ref: np.ndarray, sample: np.ndarray, k: int = 3) -> tuple[float, float]:
    def d2(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_sample = np.sort(d2(sample, sample), axis=1)[:, k]
    cross = d2(ref, sample)
    precision = (cross <= r_ref[:, None]).any(0).mean()
    recall = (cross <= r_sample[None, :]).any(1).mean()
    return float(precision), float(recall)


@pytest.fixture(scope="module")
def pr_features() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((120, 32)).astype(np.float32)
    sample = (rng.standard_normal((90, 32)) * 1.3 + 0.4).astype(np.float32)
    return ref, sample


def test_precision_recall_modes_and_blocks_agree_with_brute_force(pr_features) -> None:
    ref, sample = pr_features
    expected = _brute_force_pr(ref, sample)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for mode in ("original", "exact"):
        for rows, cols in ((10000, 10000), (7, 33)):
            got = precision_recall(ref, sample, mode=mode, row_batch_size=rows, col_batch_size=cols)
            assert (got.precision, got.recall) == pytest.approx(
                expected, abs=0.02 * (mode != "exact")
            )
            assert not got.fp16_fallback
    same = precision_recall(ref, ref, mode="exact")
    assert (same.precision, same.recall) == (1.0, 1.0)


def test_float16_overflow_falls_back_to_float32(pr_features) -> None:
    ref, sample = pr_features
    big_ref, big_sample = ref * 64, sample * 64  # squared norms ~ 32 * 4096 > 65504
    d, fell_back = distance_block(torch.from_numpy(big_ref), torch.from_numpy(big_sample))
    assert fell_back and d.dtype == torch.float32 and torch.isfinite(d).all()
    got = precision_recall(big_ref, big_sample, row_batch_size=50, col_batch_size=50)
    assert got.fp16_fallback
    assert (got.precision, got.recall) == pytest.approx(_brute_force_pr(ref, sample))
    _, small_fell_back = distance_block(torch.from_numpy(ref), torch.from_numpy(sample))
    assert not small_fell_back


def test_radii_are_kth_neighbour_excluding_self() -> None:
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    radii, _ = manifold_radii(x, k=3, mode="exact", row_batch_size=2, col_batch_size=3)
    # squared distances to the 3rd nearest other point
    np.testing.assert_allclose(radii.numpy(), [36.0, 25.0, 9.0, 25.0, 81.0])
    with pytest.raises(ValueError, match="k \\+ 1"):
        manifold_radii(x[:3], k=3)


# --------------------------------------------------------------------------- the network

EXPECTED_TENSORS = (
    472  # 94 conv units x (conv.weight, bn.{weight,bias,running_mean,running_var}) + fc
)
EXPECTED_FLOATS = (
    23_885_392  # x 4 bytes fits the 95,628,359-byte converted file (+ pickle overhead)
)
SOME_SHAPES = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_4a_3x3.bn.running_var": (192,),
    "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
    "Mixed_6d.branch1x1.conv.weight": (192, 768, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7b.branch3x3dbl_3b.conv.weight": (384, 384, 3, 1),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}


@pytest.fixture(scope="module")
def random_weights() -> dict[str, torch.Tensor]:
    return inception.random_state_dict(seed=0)


def test_converted_key_names_and_shapes(random_weights) -> None:
    assert len(random_weights) == EXPECTED_TENSORS
    assert sum(v.numel() for v in random_weights.values()) == EXPECTED_FLOATS
    for key, shape in SOME_SHAPES.items():
        assert tuple(random_weights[key].shape) == shape
    assert all(
        k.endswith(("weight", "bias", "running_mean", "running_var")) for k in random_weights
    )


def test_strict_load_with_and_without_counters(random_weights) -> None:
    model = InceptionV3()
    model.load_converted(random_weights)  # as the converter writes it: no num_batches_tracked
    counters = {k: torch.tensor(0) for k in model.state_dict() if "num_batches" in k}
    model.load_converted({**random_weights, **counters})
    torch.testing.assert_close(model.fc.weight, random_weights["fc.weight"])
    with pytest.raises(WeightsError, match="missing"):
        model.load_converted({k: v for k, v in random_weights.items() if k != "fc.bias"})
    with pytest.raises(WeightsError, match="unexpected"):
        model.load_converted({**random_weights, "AuxLogits.fc.weight": torch.zeros(1)})
    bad = dict(random_weights, **{"fc.weight": torch.zeros(1000, 2048)})
    with pytest.raises(WeightsError, match="shape"):
        model.load_converted(bad)


def test_forward_shapes_layout_and_unbiased_logits(random_weights) -> None:
    model = InceptionV3()
    model.load_converted(random_weights)
    model.eval()
    captured = {}
    model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.update(conv=o))
    images = torch.randint(0, 256, (2, 40, 24, 3), dtype=torch.uint8)  # non-square, resized
    with torch.no_grad():
        out = model(images)
        model.fc.bias.add_(100.0)
        again = model(images)
    assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 2023)
    assert out.logits.shape == (2, 1008)
    assert captured["conv"].shape == (2, 192, 17, 17)
    expected_spatial = captured["conv"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # (h, w, c)
    torch.testing.assert_close(out.spatial, expected_spatial, rtol=0, atol=0)
    assert (out.spatial >= 0).all()  # after BN + ReLU
    torch.testing.assert_close(out.logits, out.pool @ model.fc.weight.T)
    torch.testing.assert_close(again.logits, out.logits)  # the bias is never used


def test_preprocess_scales_and_skips_resize_at_299() -> None:
    images = torch.randint(0, 256, (1, 299, 299, 3), dtype=torch.uint8)
    x = InceptionV3.preprocess(images)
    assert x.shape == (1, 3, 299, 299)
    torch.testing.assert_close(x, (images.float().permute(0, 3, 1, 2) - 128) / 128)
    ramp = torch.arange(4.0).reshape(1, 1, 1, 4)  # legacy mapping: src = i * in/out, no centring
    resized = inception.tf1_resize_bilinear(ramp, (1, 8))
    torch.testing.assert_close(resized, torch.tensor([[[[0, 0.5, 1, 1.5, 2, 2.5, 3, 3]]]]))


def test_load_inception_reads_files_and_rejects_garbage(tmp_path, random_weights) -> None:
    path = tmp_path / "w.pth"
    torch.save(random_weights, path)
    model = inception.load_inception(path)
    assert model.weights_id == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        inception.load_inception(garbage)


# --------------------------------------------------------------------------- weights download


@pytest.fixture()
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_sha256_and_is_atomic(http_root, tmp_path, monkeypatch) -> None:
    root, base = http_root
    payload = np.random.default_rng(6).bytes(300_000)
    (root / "w.pth").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    cache = tmp_path / "cache"
    monkeypatch.setenv("ADM_CACHE_DIR", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no file from the user's caches
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError, match="SHA-256"):
        inception.resolve_weights(url=f"{base}/w.pth", sha256="0" * 64, progress=False)
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written is left
    got = inception.resolve_weights(url=f"{base}/w.pth", sha256=digest, progress=False)
    assert got == cache / inception.WEIGHTS_FILENAME and got.read_bytes() == payload
    (root / "w.pth").unlink()  # a second call uses the cache, no network
    assert inception.resolve_weights(url=f"{base}/w.pth", sha256=digest) == got


def test_offline_message_says_where_to_put_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ADM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError) as info:
        inception.resolve_weights(url="http://127.0.0.1:9/nothing", progress=False)
    message = str(info.value)
    assert (
        str(tmp_path / inception.WEIGHTS_FILENAME) in message and "--inception-weights" in message
    )
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(WeightsError, match="does not exist"):
        inception.resolve_weights(tmp_path / "nope.pth")


# --------------------------------------------------------------------------- npz batches


@pytest.mark.parametrize("compressed", [False, True])
def test_streaming_reader_yields_arr_0_in_chunks(tmp_path, compressed) -> None:
    images = np.random.default_rng(7).integers(0, 256, (10, 5, 7, 3), dtype=np.uint8)
    path = tmp_path / "b.npz"
    (np.savez_compressed if compressed else np.savez)(path, arr_0=images, arr_1=np.arange(10))
    source = batches.open_npz_batch(path)
    assert (source.n, source.height, source.width) == (10, 5, 7)
    chunks = list(batches.iter_npz_images(path, chunk=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    assert all(c.flags.writeable for c in chunks)
    np.testing.assert_array_equal(np.concatenate(chunks), images)


@pytest.mark.parametrize("shape", [(10, 5, 7, 1), (10, 5, 7)])
def test_grey_batches_are_read_as_rgb_with_the_channel_replicated(tmp_path, shape) -> None:
    grey = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / "grey.npz"
    np.savez(path, arr_0=grey)
    source = batches.open_npz_batch(path)
    assert (source.n, source.height, source.width, source.is_grey) == (10, 5, 7, True)
    assert source.layout == ("[N, H, W, 1]" if len(shape) == 4 else "[N, H, W]")
    chunks = list(batches.iter_images(source, chunk=4))
    assert [c.shape for c in chunks] == [(4, 5, 7, 3), (4, 5, 7, 3), (2, 5, 7, 3)]
    expected = np.repeat(grey.reshape(10, 5, 7, 1), 3, axis=-1)
    np.testing.assert_array_equal(np.concatenate(chunks), expected)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 8, 8, 3), np.uint8)}, "no array 'arr_0'"),
        ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "uint8"),
        ({"arr_0": np.zeros((4, 8, 8, 2), np.uint8)}, "uint8 images"),
        ({"arr_0": np.zeros((8, 8, 3), np.uint8)}, "looks like one colour image"),
        ({"arr_0": np.zeros((0, 8, 8, 1), np.uint8)}, "holds no images"),
        ({"arr_0": np.zeros((4, 3, 8, 8), np.uint8)}, r"\[N, H, W, 3\]"),
    ],
)
def test_bad_batches_are_rejected_from_headers(tmp_path, arrays, message) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(batches.BatchError, match=message):
        batches.open_npz_batch(path)


def test_missing_and_non_zip_files(tmp_path) -> None:
    with pytest.raises(batches.BatchError, match="no such file"):
        batches.open_npz_batch(tmp_path / "none.npz")
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(batches.BatchError, match="not a readable"):
        batches.open_npz_batch(tmp_path / "x.npz")


def test_reference_stats_must_be_complete(tmp_path) -> None:
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=np.zeros((4, 2, 2, 3), np.uint8), mu=np.zeros(2048))
    with pytest.raises(batches.BatchError, match="not"):
        batches.read_reference_stats(path)
    np.savez(path, arr_0=np.zeros((4, 2, 2, 3), np.uint8))
    assert batches.read_reference_stats(path) is None


def test_npz_writer_streams_and_atomic_path_cleans_up(tmp_path) -> None:
    images = np.random.default_rng(8).integers(0, 256, (5, 3, 4, 3), dtype=np.uint8)
    out = tmp_path / "out.npz"
    with atomic_path(out) as tmp, batches.NpzWriter(tmp) as writer:
        with writer.stream("arr_0", images.shape) as write:
            write(images[:2])
            write(images[2:])
        writer.write_array("mu", np.arange(3.0))
    with np.load(out) as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["mu"], np.arange(3.0))
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "never.npz") as tmp:
        Path(tmp).write_text("partial")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]
    assert zipfile.is_zipfile(out)


def test_frechet_distance_of_a_small_sample_set_equals_the_full_computation():
    from adm.evaluation.metrics import (
        compute_statistics,
        frechet_distance,
        frechet_distance_to_features,
    )

    rng = np.random.default_rng(0)
    ref = compute_statistics(rng.normal(size=(300, 40)) @ rng.normal(size=(40, 40)))
    sample = rng.normal(size=(12, 40)) + 0.5
    expected = frechet_distance(compute_statistics(sample), ref)
    assert frechet_distance_to_features(sample, ref) == pytest.approx(expected, rel=1e-7)


def test_channels_last_features_agree_to_float32_roundoff(random_weights) -> None:
    """`adm eval`'s default on a CPU (`--memory-format auto`): NHWC convolutions, same features."""
    model = InceptionV3()
    model.load_converted(random_weights)
    model.eval()
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (1, 40, 40, 3), dtype=torch.uint8, generator=gen)
    with torch.inference_mode():
        plain = model(images)
        nhwc = model.use_channels_last()(images)
    assert model.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain, nhwc, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
