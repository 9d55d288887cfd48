"""`adm eval` and `adm stats` end to end on tiny batches with a random-weight Inception, the
feature cache, and one-line errors (exit 2, nothing written) on bad inputs."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm.cli import main as cli
from adm.evaluation import batches, evaluate, features, inception, metrics

CPU = not torch.cuda.is_available()  # `adm eval --memory-format auto`: channels_last on a CPU
ORDER = ["Inception Score", "Inception Score std", "FID", "sFID", "Precision", "Recall"]


@pytest.fixture(autouse=True)
def one_thread():
    """2 shared cores: one intra-op thread runs Inception several times faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    weights = root / "random_inception.pth"
    torch.save(inception.random_state_dict(seed=1), weights)
    ref = root / "ref.npz"
    np.savez(ref, arr_0=rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8))
    sample = root / "sample.npz"
    images = rng.integers(0, 256, (4, 20, 28, 3), dtype=np.uint8)
    np.savez(sample, arr_0=images, arr_1=np.arange(4))
    folder = root / "images"
    (folder / "class_b").mkdir(parents=True)
    for i in range(5):
        sub = folder / ("class_b" if i % 2 else "")
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    return {"root": root, "weights": weights, "ref": ref, "sample": sample, "folder": folder}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _numbers(out: str) -> dict[str, float]:
    lines = out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ORDER  # the original's order
    return {line.split(":")[0]: float(line.split(":")[1]) for line in lines}


@pytest.fixture(scope="module")
def first_eval(files) -> tuple[list, dict[str, float], Path]:
    out_json = files["root"] / "scores.json"
    args = ["eval", files["ref"], files["sample"], "--inception-weights", files["weights"]]
    code = cli.main([str(a) for a in [*args, "--json", out_json, "--batch-size", 3]])
    assert code == 0
    return args, json.loads(out_json.read_text()), out_json


def test_eval_end_to_end(files, first_eval) -> None:
    _, record, _ = first_eval
    assert record["n_ref"] == 5 and record["n_sample"] == 4 and not record["ref_stats_from_file"]
    numbers = [record[k] for k in ("inception_score", "fid", "sfid", "precision", "recall")]
    assert np.isfinite(numbers).all() and record["inception_score"] >= 1
    assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
    caches = sorted(p.name for p in files["root"].glob("*.adm-features-*.npz"))
    assert len(caches) == 2 and caches[0].startswith("ref.npz.")


def test_features_come_back_from_the_cache(files, first_eval, monkeypatch) -> None:
    _, record, _ = first_eval

    def no_extraction(*a, **k):
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(features, "extract_features", no_extraction)
    model = inception.load_inception(files["weights"]).use_channels_last(CPU)  # as adm eval
    ref, sample = (batches.open_npz_batch(files[k]) for k in ("ref", "sample"))
    ref_feats = evaluate.batch_features(ref, model)
    sample_feats = evaluate.batch_features(sample, model)
    assert sample_feats.pool.shape == (4, 2048) and sample_feats.logits.shape == (4, 1008)
    assert metrics.inception_score(sample_feats.logits) == record["inception_score"]
    pr = metrics.precision_recall(ref_feats.pool, sample_feats.pool)
    assert (pr.precision, pr.recall) == (record["precision"], record["recall"])


@pytest.mark.slow
def test_eval_again_prints_the_same_numbers_from_the_cache(first_eval, capsys, monkeypatch) -> None:
    args, record, _ = first_eval
    monkeypatch.setattr(features, "extract_features", None)  # would fail if called
    code, out, _ = _run(capsys, *args)
    numbers = _numbers(out)  # checks the original's order of the five lines
    assert code == 0 and numbers["FID"] == record["fid"] and numbers["sFID"] == record["sfid"]
    assert numbers["Inception Score"] == record["inception_score"]
    assert (numbers["Precision"], numbers["Recall"]) == (record["precision"], record["recall"])


def test_eval_a_folder_with_a_metric_subset_and_kid(files, first_eval, capsys) -> None:
    """A folder of PNGs as the samples, against the npz reference (features from its cache):
    only the chosen metrics, in the report's order; KID equals the library's on the features."""
    weights = ["--inception-weights", files["weights"]]
    argv = ["eval", files["ref"], files["folder"], "--metrics", "kid,is", *weights]
    code, out, err = _run(capsys, *argv, "--no-progress", "--kid-subsets", 7)
    assert code == 0, err
    labels = [line.split(":")[0] for line in out.splitlines()]
    assert labels == ["Inception Score", "Inception Score std", "KID", "KID std"]
    assert "note: KID subsets of 5 rows (the smaller set's size), not 1000" in err
    model = inception.load_inception(files["weights"]).use_channels_last(CPU)  # as adm eval
    sample = features.extract_features(batches.open_source(files["folder"]), model)
    ref = features.batch_features(batches.open_npz_batch(files["ref"]), model)
    kid = metrics.kernel_distance(sample.pool, ref.pool, subsets=7, subset_size=5)
    numbers = {line.split(": ")[0]: float(line.split(": ")[1]) for line in out.splitlines()}
    assert numbers["KID"] == pytest.approx(kid.mean, rel=1e-6, abs=1e-9)
    assert numbers["KID std"] == pytest.approx(kid.std, rel=1e-6, abs=1e-9)
    assert numbers["Inception Score"] == pytest.approx(metrics.inception_score(sample.logits))
    glob = str(files["folder"] / "**" / "*.png")  # the same five files, as a glob
    code, glob_out, _ = _run(
        capsys, *argv[:2], glob, *argv[3:], "--no-progress", "--kid-subsets", 7
    )
    assert code == 0 and glob_out == out


def test_stats_from_a_folder(files, capsys) -> None:
    ref = files["root"] / "folder_ref.npz"
    weights = ["--inception-weights", files["weights"]]
    code, out, _ = _run(capsys, "stats", files["folder"], ref, "--num-images", 4, *weights)
    assert code == 0 and "5 images" in out
    with np.load(ref) as data:
        assert data["arr_0"].shape == (4, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        assert data["mu"].shape == (2048,) and data["sigma"].shape == (2048, 2048)
        assert data["mu_s"].shape == (2023,) and data["sigma_s"].shape == (2023, 2023)
        assert np.allclose(data["sigma"], data["sigma"].T) and (np.diag(data["sigma"]) >= 0).all()


@pytest.mark.slow
def test_eval_uses_stored_statistics_and_zero_fid_against_itself(files, capsys) -> None:
    ref = files["root"] / "self_ref.npz"
    weights = ["--inception-weights", files["weights"]]
    assert _run(capsys, "stats", files["sample"], ref, *weights)[0] == 0
    out_json = files["root"] / "self.json"
    code, out, _ = _run(
        capsys, "eval", ref, files["sample"], *weights, "--no-cache", "--json", out_json
    )
    numbers = _numbers(out)
    assert code == 0 and json.loads(out_json.read_text())["ref_stats_from_file"]
    assert abs(numbers["FID"]) < 1e-3 and abs(numbers["sFID"]) < 1e-3
    assert numbers["Precision"] == numbers["Recall"] == 1.0
    assert not list(files["root"].glob("self_ref.npz.adm-features-*"))


@pytest.fixture(scope="module")
def grey(files) -> dict[str, Path]:
    """The sample batch's first channel as grey [N, H, W, 1] and [N, H, W], and as the RGB batch
    with that channel replicated."""
    root = files["root"] / "grey"
    root.mkdir()
    with np.load(files["sample"]) as data:
        g = data["arr_0"][..., :1]
    out = {"nhw1": g, "nhw": g[..., 0], "rgb": np.repeat(g, 3, axis=-1)}
    for name, array in out.items():
        np.savez(root / f"{name}.npz", arr_0=array)
    return {name: root / f"{name}.npz" for name in out}


def test_eval_reads_grey_batches_as_rgb_with_a_note(files, grey, capsys, monkeypatch) -> None:
    out_json = grey["nhw1"].with_name("scores.json")
    argv = ["eval", files["ref"], grey["nhw1"], "--inception-weights", files["weights"]]
    code, _, err = _run(capsys, *argv, "--json", out_json)
    assert code == 0, err
    assert [line for line in err.splitlines() if "grey" in line] == [
        f"note: {grey['nhw1']} holds grey images [N, H, W, 1]; the channel is replicated to RGB "
        "for Inception"
    ]
    # The grey batch's features, cached under its own file's SHA-256, equal those of the RGB
    # batch with the channel replicated exactly (and so do the numbers made from them).
    assert len(list(grey["nhw1"].parent.glob("nhw1.npz.adm-features-*.npz"))) == 1
    model = inception.load_inception(files["weights"]).use_channels_last(CPU)  # as adm eval
    rgb = evaluate.batch_features(batches.open_npz_batch(grey["rgb"]), model, use_cache=False)
    monkeypatch.setattr(features, "extract_features", None)  # would fail if called
    cached = evaluate.batch_features(batches.open_npz_batch(grey["nhw1"]), model)
    assert np.array_equal(cached.pool, rgb.pool) and np.array_equal(cached.logits, rgb.logits)
    assert np.array_equal(cached.pool_stats.sigma, rgb.pool_stats.sigma)
    assert np.array_equal(cached.spatial_stats.mu, rgb.spatial_stats.mu)
    record = json.loads(out_json.read_text())
    assert record["inception_score"] == metrics.inception_score(rgb.logits)


def test_stats_of_a_grey_batch_equal_those_of_the_rgb_batch(files, grey, capsys) -> None:
    weights = ["--inception-weights", files["weights"]]
    refs = {}
    for name in ("rgb", "nhw"):
        refs[name] = grey[name].with_name(f"ref_{name}.npz")
        code, _, err = _run(capsys, "stats", grey[name], refs[name], "--num-images", 4, *weights)
        assert code == 0, err
        assert ("holds grey images [N, H, W];" in err) == (name == "nhw")
    with np.load(refs["rgb"]) as a, np.load(refs["nhw"]) as b:
        assert b["arr_0"].shape == (4, 20, 28, 3)  # written as RGB: a standard reference batch
        for key in ("arr_0", "mu", "sigma", "mu_s", "sigma_s"):
            assert np.array_equal(a[key], b[key]), key


def _bad_inputs(root: Path) -> dict[str, Path]:
    np.savez(root / "no_arr0.npz", images=np.zeros((5, 8, 8, 3), np.uint8))
    np.savez(root / "float.npz", arr_0=np.zeros((5, 8, 8, 3), np.float32))
    np.savez(root / "two_channels.npz", arr_0=np.zeros((5, 8, 8, 2), np.uint8))
    np.savez(root / "one_image.npz", arr_0=np.zeros((8, 8, 3), np.uint8))
    np.savez(root / "tiny.npz", arr_0=np.zeros((3, 8, 8, 3), np.uint8))
    np.savez(root / "half_stats.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8), mu=np.zeros(2048))
    (root / "garbage.pth").write_bytes(b"\x00" * 100)
    (root / "text.npz").write_text("not a zip")
    return {p.stem: p for p in root.iterdir()}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_ref", "no such file"),
        ("no_arr0", "neither images (arr_0) nor statistics"),
        ("float", "uint8"),
        ("two_channels", "uint8 images"),
        ("one_image", "looks like one colour image"),
        ("tiny", "pr needs >= 4"),
        ("half_stats", "but not"),
        ("text", "not a readable .npz"),
        ("garbage_weights", "cannot read Inception weights"),
        ("missing_weights", "does not exist"),
        ("json_folder_missing", "does not exist"),
        ("bad_device", "--device"),
    ],
)
def test_eval_bad_inputs_fail_in_one_line(files, capsys, tmp_path, case, message) -> None:
    bad = _bad_inputs(tmp_path)
    ref, sample, weights = files["ref"], files["sample"], files["weights"]
    extra: list = []
    if case == "missing_ref":
        ref = tmp_path / "nope.npz"
    elif case in ("no_arr0", "float", "two_channels", "one_image", "tiny", "half_stats", "text"):
        ref = bad[case]
    elif case == "garbage_weights":
        weights = bad["garbage"]
    elif case == "missing_weights":
        weights = tmp_path / "nope.pth"
    elif case == "json_folder_missing":
        extra = ["--json", tmp_path / "no" / "such" / "scores.json"]
    elif case == "bad_device":
        extra = ["--device", "cuda:0" if not torch.cuda.is_available() else "nonsense"]
    before = sorted(os.listdir(tmp_path))
    code, out, err = _run(capsys, "eval", ref, sample, "--inception-weights", weights, *extra)
    assert code == 2 and out == ""
    assert err.startswith("adm eval: error:") and message in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("notes.pth", b"download the weights from github\n", "a text file starting 'download"),
        ("noise.pth", bytes([7, 255, 13, 200]) * 256, "unrecognised binary data"),
        ("objects.pkl", pickle.dumps({"weights": [1.0, 2.0]}, protocol=4), "refused"),
        ("model.pt", None, "entry 'step' is a int, not a tensor"),
        ("page.pth", b"<!DOCTYPE html><html>Not Found</html>", "an HTML/XML page"),
    ],
)
def test_inception_weights_that_are_not_a_checkpoint_get_our_message(
    files, capsys, tmp_path, name, content, message
) -> None:
    path = tmp_path / name
    if content is None:
        torch.save({"weight": torch.zeros(2), "step": 3}, path)
    else:
        path.write_bytes(content)
    before = sorted(os.listdir(tmp_path))
    for argv in (["eval", files["ref"], files["sample"]], ["stats", files["folder"], "o.npz"]):
        code, out, err = _run(capsys, *argv, "--inception-weights", path)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert f"cannot read Inception weights: {path}: " in err and message in err, err
        assert "weights_only" not in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before


def test_stats_bad_inputs_fail_in_one_line(files, capsys, tmp_path) -> None:
    weights = ["--inception-weights", files["weights"]]
    (tmp_path / "empty").mkdir()
    cases = [
        ((tmp_path / "empty", tmp_path / "o.npz"), "no image files"),
        ((files["sample"], tmp_path / "no" / "o.npz"), "does not exist"),
        ((files["sample"], tmp_path), "is a folder"),
        ((files["sample"], tmp_path / "o.npz", "--seed", "-1"), "--seed must be at least 0"),
    ]
    for (source, out, *extra), message in cases:
        code, _, err = _run(capsys, "stats", source, out, *extra, *weights)
        assert code == 2 and err.startswith("adm stats: error:") and message in err, err
    assert not (tmp_path / "o.npz").exists()


def _real_weights() -> Path | None:
    path = inception.cache_dir() / inception.WEIGHTS_FILENAME
    return path if path.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_real_weights() is None, reason="real Inception weights not in the cache")
def test_eval_with_the_real_weights(files, capsys) -> None:
    code, out, _ = _run(capsys, "eval", files["ref"], files["sample"], "--no-cache")
    assert code == 0 and np.isfinite(list(_numbers(out).values())).all()
