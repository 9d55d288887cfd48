"""`adm eval`'s inputs and metric selection, KID and IS std: closed forms on small synthetic
features, every input kind (npz, statistics file, folder, glob), one-line errors, no network."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from adm.cli import main as cli
from adm.evaluation import batches, inputs, metrics

# --------------------------------------------------------------------------- KID and IS std


def test_kid_of_two_constant_sets_is_the_closed_form() -> None:
    # X = n copies of 0, Y = n copies of delta*1 in d dims: k(0,0) = 1, k(y,y) = (1 + delta²)³,
    # k(0,y) = 1, so the unbiased MMD² of every subset is (1 + delta²)³ - 1, with std 0.
    d, delta = 8, 0.7
    x, y = np.zeros((6, d)), np.full((5, d), delta)
    kid = metrics.kernel_distance(y, x, subsets=4, subset_size=3)
    assert kid.mean == pytest.approx((1 + delta**2) ** 3 - 1, rel=1e-12)
    assert kid.std == pytest.approx(0, abs=1e-12) and kid.subset_size == 3


def _mmd2_by_loops(x: np.ndarray, y: np.ndarray) -> float:
    def k(a, b):
        return (a @ b / len(a) + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2


def test_kid_subsets_are_torch_fidelitys_draws_of_the_unbiased_mmd() -> None:
    rng = np.random.default_rng(0)
    sample, ref = rng.standard_normal((9, 5)), rng.standard_normal((7, 5)) + 0.5
    kid = metrics.kernel_distance(sample, ref, subsets=3, subset_size=4, seed=11)
    draws = np.random.RandomState(11)  # samples first, then the reference, per subset
    expected = []
    for _ in range(3):
        xs = sample[draws.choice(9, 4, replace=False)]
        ys = ref[draws.choice(7, 4, replace=False)]
        expected.append(_mmd2_by_loops(xs, ys))
    assert kid.mean == pytest.approx(np.mean(expected), rel=1e-12)
    assert kid.std == pytest.approx(np.std(expected), rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    same = metrics.kernel_distance(a, b, subsets=5, subset_size=200)
    shifted = metrics.kernel_distance(a + 1.0, b, subsets=5, subset_size=200)
    # the shift's population MMD² here is (1 + 1)³ − 1 + O(1/d) terms: far above the noise
    assert abs(same.mean) < 0.05 and shifted.mean > 3
    with pytest.raises(ValueError, match="do not match"):
        metrics.kernel_distance(a, b[:, :3])


def test_inception_score_std_over_splits() -> None:
    confident = np.full((4, 10), -50.0)
    confident[[0, 1], [0, 0]] = confident[[2, 3], [1, 1]] = 50.0  # two classes: IS 2
    uniform = np.zeros((4, 10))  # IS 1
    logits = np.concatenate([confident, uniform])
    assert metrics.inception_score(logits, split_size=4) == pytest.approx(1.5)
    assert metrics.inception_score_std(logits, split_size=4) == pytest.approx(0.5)
    assert metrics.inception_score_std(logits, split_size=8) == 0.0


# --------------------------------------------------------------------------- metric names


def test_metrics_are_parsed_into_the_report_order() -> None:
    assert inputs.parse_metrics("kid, FID ,is,kid") == ("is", "fid", "kid")
    assert inputs.DEFAULT_METRICS == ("is", "fid", "sfid", "pr")
    for bad, message in (("fid,fdd", "unknown metric 'fdd'"), (",", "no metric named")):
        with pytest.raises(batches.BatchError, match=message):
            inputs.parse_metrics(bad)


# --------------------------------------------------------------------------- input kinds


def _stats_file(path, rng, dim=2048):
    """pytorch-fid's layout: `mu` [dim], `sigma` [dim, dim] (diagonal: FID has a closed form)."""
    np.savez(path, mu=rng.standard_normal(dim), sigma=np.diag(rng.uniform(0.1, 2.0, dim)))
    return path


def test_a_pytorch_fid_statistics_file_serves_fid_and_nothing_else(tmp_path) -> None:
    rng = np.random.default_rng(2)
    stats = inputs.open_input(_stats_file(tmp_path / "fid_stats.npz", rng))
    assert stats.images is None and list(stats.stats) == ["pool"]
    batch = tmp_path / "b.npz"
    np.savez(batch, arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    sample = inputs.open_input(batch)
    inputs.check_requirements(("fid",), stats, sample)
    cases = {
        "pr": "pr needs images on both sides (features of real images, not just statistics); "
        f"{tmp_path / 'fid_stats.npz'} is a statistics file (mu, sigma)",
        "sfid": "sfid needs images or spatial statistics (mu_s, sigma_s)",
        "kid": "kid needs images on both sides",
        "fd_dinov2": "fd_dinov2 needs images or DINOv2 statistics",
    }
    for metric, message in cases.items():
        with pytest.raises(batches.BatchError) as err:
            inputs.check_requirements((metric,), stats, sample)
        assert str(err.value).startswith(message)
    with pytest.raises(batches.BatchError, match="is needs the samples' images"):
        inputs.check_requirements(("is",), sample, stats)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"mu": np.zeros(2048)}, "has mu but not sigma"),
        ({"mu": np.zeros(2048), "sigma": np.eye(2047)}, "sigma has shape [2047, 2047]"),
        ({"mu": np.full(2048, np.nan), "sigma": np.eye(2048)}, "mu holds 2048 NaN or infinite"),
        ({"mu_s": np.zeros(2023), "sigma_s": np.eye(2023), "sigma": np.eye(2048)}, "sigma but"),
        ({"labels": np.zeros(3)}, "neither images (arr_0) nor statistics"),
    ],
)
def test_bad_statistics_files_are_one_clear_error(tmp_path, arrays, message) -> None:
    path = tmp_path / "stats.npz"
    np.savez(path, **arrays)
    with pytest.raises(batches.BatchError) as err:
        inputs.open_input(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


@pytest.fixture
def image_files(tmp_path):
    """Five images in a tree: RGB 12x10, one grey, one RGBA, one 20x16 (resized), as PNG, JPEG
    and WebP, and the same pixels (after PIL's conversions) as an npz batch."""
    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    specs = [
        ("a.png", "RGB", (12, 10)),
        ("sub/b.png", "L", (12, 10)),
        ("sub/c.png", "RGBA", (12, 10)),
        ("d.webp", "RGB", (12, 10)),
        ("e.png", "RGB", (20, 16)),
    ]
    for name, mode, size in specs:
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(
            root / name, lossless=True
        )
    (root / "notes.txt").write_text("not an image")
    return root


def test_folders_and_globs_read_every_image_as_rgb_with_notes(image_files) -> None:
    folder = inputs.open_input(image_files)
    assert folder.images.n == 5 and (folder.images.width, folder.images.height) == (12, 10)
    notes = " | ".join(folder.images.notes)
    assert "1 of 5 images differ from 12x10" in notes and "resized" in notes
    assert "1 grey images" in notes and "1 images with an alpha channel" in notes
    chunks = list(batches.iter_images(folder.images, chunk=2))
    assert [c.shape for c in chunks] == [(2, 10, 12, 3), (2, 10, 12, 3), (1, 10, 12, 3)]
    grey = np.asarray(Image.open(image_files / "sub" / "b.png"))
    at = folder.images.files.index(image_files / "sub" / "b.png")
    assert np.array_equal(np.concatenate(chunks)[at], np.repeat(grey[..., None], 3, -1))
    glob = inputs.open_input(str(image_files / "**" / "*.png"))
    assert glob.images.n == 4 and glob.images.files == tuple(
        p for p in folder.images.files if p.suffix == ".png"
    )


def test_empty_folders_and_globs_are_one_clear_error(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    with pytest.raises(batches.BatchError, match="no image files"):
        inputs.open_input(tmp_path / "empty")
    with pytest.raises(batches.BatchError, match=r"matches no image files .*\(1 other files\)"):
        inputs.open_input(str(tmp_path / "empty" / "*"))


# --------------------------------------------------------------------------- the command


def test_fid_of_two_statistics_files_runs_without_any_network(tmp_path) -> None:
    """As a user runs it (a subprocess): pytorch-fid statistics on both sides, FID only; the
    weights option points nowhere, so loading Inception would fail."""
    rng = np.random.default_rng(4)
    ref = _stats_file(tmp_path / "ref.npz", rng)
    sample = _stats_file(tmp_path / "sample.npz", rng)
    out = tmp_path / "fid.json"
    run = subprocess.run(
        [sys.executable, "-m", "adm", "eval", ref, sample, "--metrics", "fid", "--json", out,
         "--inception-weights", tmp_path / "none.pth"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    with np.load(ref) as r, np.load(sample) as s:  # diagonal: ‖Δμ‖² + Σ (√a − √b)²
        a, b = np.diag(s["sigma"]), np.diag(r["sigma"])
        expected = np.sum((s["mu"] - r["mu"]) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert run.stdout.startswith("FID: ") and run.stdout.count("\n") == 1
    assert float(run.stdout[5:]) == pytest.approx(expected, rel=1e-9)
    record = json.loads(out.read_text())
    assert record["fid"] == float(run.stdout[5:]) and record["metrics"] == ["fid"]
    assert record["stats_from_file"] == {"ref": ["fid"], "sample": ["fid"]}
    assert record["inception_score"] is None and record["inception_weights_sha256"] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--metrics", "fid,lpips"], "--metrics: unknown metric 'lpips'; choose from"),
        (["--metrics", "pr"], "pr needs images on both sides"),
        (["--kid-subset-size", "1"], "--kid-subset-size must be at least 2"),
    ],
)
def test_bad_metric_choices_fail_in_one_line(tmp_path, capsys, argv, message) -> None:
    rng = np.random.default_rng(5)
    ref = _stats_file(tmp_path / "ref.npz", rng)
    batch = tmp_path / "b.npz"
    np.savez(batch, arr_0=np.zeros((5, 8, 8, 3), np.uint8))
    code = cli.main(["eval", str(ref), str(batch), *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("adm eval: error: ") and message in err, err


# --------------------------------------------------------------------------- the feature cache


def test_the_cache_is_keyed_by_network_preprocessing_and_weights(tmp_path) -> None:
    from adm.evaluation import features

    batch = tmp_path / "b.npz"
    np.savez(batch, arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    source = batches.open_npz_batch(batch)
    calls = []

    def compute(value):
        def run():
            calls.append(value)
            return {"rows_x": np.full((3, 2), value), "mu": np.array([value])}

        return run

    first = features.cached_arrays(source, "net-a|prep-1|sha-1", compute(1.0))
    again = features.cached_arrays(source, "net-a|prep-1|sha-1", compute(2.0))
    assert calls == [1.0] and np.array_equal(again["rows_x"], first["rows_x"])
    for other in ("net-b|prep-1|sha-1", "net-a|prep-2|sha-1", "net-a|prep-1|sha-2"):
        assert features.cached_arrays(source, other, compute(3.0))["mu"][0] == 3.0
    assert len(calls) == 4 and len(list(tmp_path.glob("b.npz.adm-features-*.npz"))) == 4
    np.savez(batch, arr_0=np.ones((3, 8, 8, 3), np.uint8))  # new content: a new key
    assert features.cached_arrays(source, "net-a|prep-1|sha-1", compute(4.0))["mu"][0] == 4.0
    assert features.cached_arrays(source, None, compute(5.0))["mu"][0] == 5.0  # never cached
