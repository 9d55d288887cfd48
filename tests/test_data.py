"""Training data: folders, labels, .npz and IDX readers, bad files, deterministic per-rank plans."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adm.data import datasets as data


def _image(path: Path, color: int, size: tuple[int, int] = (20, 24), mode: str = "RGB") -> None:
    rng = np.random.default_rng(color)
    arr = (rng.random((size[1], size[0], 3)) * 60).astype(np.uint8)
    arr[..., color % 3] += 150
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i in range(3):
        _image(tmp_path / f"cat_{i}.png", 0)
        _image(tmp_path / "sub" / f"dog_{i}.JPG", 1)
    _image(tmp_path / "sub" / "deep" / "cat_9.webp", 2)
    _image(tmp_path / "bird_0.gif", 2, mode="P")
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def test_listing_is_recursive_sorted_and_filters_extensions(folder: Path) -> None:
    files = data.list_image_files(folder)
    assert len(files) == 8
    assert files == sorted(files)
    assert {p.suffix.lower() for p in files} == {".png", ".jpg", ".webp", ".gif"}


def test_labels_from_filename_prefix_follow_the_original(folder: Path) -> None:
    src = data.ImageFolder(folder, labelled=True, rule="filename")
    assert src.class_names == ("bird", "cat", "dog")  # sorted unique prefixes
    names = [src.class_names[i] for i in src.labels]
    assert names == [p.name.split("_")[0] for p in src.files]


def test_labels_from_subfolders(tmp_path: Path) -> None:
    for cls in ("b", "a"):
        for i in range(2):
            _image(tmp_path / cls / "x" / f"img{i}.png", i)
    src = data.ImageFolder(tmp_path, labelled=True, rule="folder")
    assert src.class_names == ("a", "b")
    assert src.labels.tolist() == [0, 0, 1, 1]
    _image(tmp_path / "loose.png", 0)
    with pytest.raises(data.DataError, match=r"loose\.png is not inside a class sub-folder"):
        data.ImageFolder(tmp_path, labelled=True, rule="folder")


def test_empty_folder_and_single_class_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"no images .* found under"):
        data.open_source(tmp_path / "empty")
    with pytest.raises(data.DataError, match="does not exist"):
        data.open_source(tmp_path / "missing")
    for i in range(2):
        _image(tmp_path / "one" / f"cat_{i}.png", i)
    src = data.open_source(tmp_path / "one", labelled=True)
    with pytest.raises(data.DataError, match="at least 2 classes, found 1 \\('cat'\\)"):
        data.check_conditional(src)


def test_pipeline_is_deterministic_per_item_and_flips(folder: Path) -> None:
    src = data.ImageFolder(folder)
    ds = data.TrainingImages(src, 16, random_crop=True, seed=3)
    a, _ = ds[(0, 1)]
    b, _ = ds[(0, 1)]
    assert a.shape == (3, 16, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    # Over epochs the flip happens about half the time and mirrors the centre crop exactly.
    ds = data.TrainingImages(src, 16, seed=0)
    centre = data.to_chw_float(data.center_crop_arr(src.load(0).convert("RGB"), 16))
    flips = [not np.array_equal(ds[(e, 0)][0], centre) for e in range(40)]
    assert 8 < sum(flips) < 32
    flipped = next(ds[(e, 0)][0] for e in range(40) if flips[e])
    np.testing.assert_array_equal(flipped, centre[:, :, ::-1])


def test_grey_channel_and_gif_palette(folder: Path) -> None:
    src = data.ImageFolder(folder)
    x, _ = data.TrainingImages(src, 8, channels=1)[(0, 0)]
    assert x.shape == (1, 8, 8)
    gif = next(i for i, p in enumerate(src.files) if p.suffix == ".gif")
    assert data.TrainingImages(src, 8)[(0, gif)][0].shape == (3, 8, 8)


def test_bad_image_names_the_file_or_is_skipped(folder: Path) -> None:
    bad = folder / "cat_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    src = data.ImageFolder(folder)
    ds = data.TrainingImages(src, 8)
    items = [ds[(0, i)] for i in range(len(src))]
    assert sum(isinstance(it, data.BadImage) for it in items) == 1
    with pytest.raises(data.DataError, match=r"cat_bad\.png"):
        data.collate(items)
    x, _, skipped = data.collate(items, skip_bad=True)
    assert x.shape == (len(src), 3, 8, 8) and torch.isfinite(x).all()
    assert [b.name for b in skipped] == [str(bad)]


def test_npz_batches(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (6, 10, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "b.npz", images, np.array([5, 7, 5, 7, 9, 9]))
    src = data.open_source(tmp_path / "b.npz", labelled=True)
    assert len(src) == 6 and src.class_names == ("5", "7", "9")
    assert src.labels.tolist() == [0, 1, 0, 1, 2, 2]
    np.testing.assert_array_equal(np.asarray(src.load(2)), images[2])
    np.savez(tmp_path / "nolabels.npz", images)
    with pytest.raises(data.DataError, match="needs labels in arr_1"):
        data.open_source(tmp_path / "nolabels.npz", labelled=True)


def _idx(array: np.ndarray, code: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    return header + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


@pytest.mark.parametrize("compressed", [False, True])
def test_idx_mnist_format(tmp_path: Path, compressed: bool) -> None:
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if compressed else ""
    wrap = gzip.compress if compressed else (lambda b: b)
    (tmp_path / f"train-images-idx3-ubyte{suffix}").write_bytes(wrap(_idx(images, 0x08)))
    (tmp_path / f"train-labels-idx1-ubyte{suffix}").write_bytes(wrap(_idx(labels, 0x08)))
    np.testing.assert_array_equal(
        data.read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}"), images
    )
    src = data.open_source(tmp_path, labelled=True)
    assert src.class_names == ("1", "3", "4", "5") and src.labels.tolist() == [1, 0, 2, 0, 3]
    x, label = data.TrainingImages(src, 32, channels=1)[(0, 0)]
    assert x.shape == (1, 32, 32) and label == 1
    floats = np.arange(6, dtype=">f4").reshape(2, 3)
    (tmp_path / "f.idx").write_bytes(_idx(floats, 0x0D))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "f.idx"), floats.astype(np.float32))
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(tmp_path / "junk")


def test_batch_plan_is_world_size_invariant_and_resumable() -> None:
    one = data.BatchPlan(10, 4, seed=1)
    two = [data.BatchPlan(10, 4, rank=r, world_size=2, seed=1) for r in range(2)]
    for step in range(7):  # crosses epoch boundaries (10 items, 4 per step)
        assert one.keys(step) == two[0].keys(step) + two[1].keys(step)
    stream = [k for step in range(5) for k in one.keys(step)]
    assert sorted(i for e, i in stream if e == 0) == list(range(10))  # a permutation per epoch
    assert stream[:8] != [(0, i) for i in range(8)]  # shuffled
    fresh = data.BatchPlan(10, 4, seed=1)
    assert next(fresh.iter_from(3)) == one.keys(3)
    with pytest.raises(data.DataError, match="not divisible"):
        data.BatchPlan(10, 5, world_size=2)


def test_held_out_split_is_deterministic(folder: Path) -> None:
    src = data.ImageFolder(folder, labelled=True)
    a_train, a_val = data.split_held_out(src, 0.25, seed=0)
    _, b_val = data.split_held_out(src, 0.25, seed=0)
    assert a_val.indices.tolist() == b_val.indices.tolist() and len(a_val) == 2
    assert sorted([*a_train.indices, *a_val.indices]) == list(range(len(src)))
    assert a_val.labels.tolist() == src.labels[a_val.indices].tolist()


def test_loader_yields_this_ranks_share(folder: Path) -> None:
    src = data.ImageFolder(folder, labelled=True)
    ds = data.TrainingImages(src, 8, random_flip=False)
    plan = data.BatchPlan(len(src), 4, rank=1, world_size=2, seed=0)
    x, y, bad = next(data.loader(ds, plan, start_step=2))
    expected = [src.labels[i] for _, i in plan.keys(2)]
    assert x.shape == (2, 3, 8, 8) and y.tolist() == expected and bad == []
