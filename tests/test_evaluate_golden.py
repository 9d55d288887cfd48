"""Every case of `golden/eval/golden.json` (the original TensorFlow evaluator's numbers) at its
tolerances. What to compute is read from each case's content, never from its name: FID on the
`pool` (or `feats`) pair, sFID on the `spatial` pair, precision/recall on the same pair as FID, IS
on `sample_logits` per split size, expected arrays from the network-side inputs in the same file.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from adm.evaluation.inception import spatial_features, tf1_resize_bilinear
from adm.evaluation.metrics import (
    compute_statistics,
    frechet_distance,
    inception_score_splits,
    precision_recall,
)
from conftest import golden_dir, golden_problem

pytestmark = pytest.mark.golden

EVAL_DIR = golden_dir() / "eval"
FEATURE_PAIR = {  # metric -> feature families it is computed on, in order of preference
    "fid": ("pool", "feats"),
    "sfid": ("spatial",),
    "precision": ("pool", "feats"),
    "recall": ("pool", "feats"),
}
ARRAY_IN_FILE = "array in the same file"


@functools.cache
def _spec() -> dict:
    return json.loads((EVAL_DIR / "golden.json").read_text())


def _items() -> list:
    """(case, item) pairs; one item per expected number, IS split size, array and flag. A missing
    or empty case set gives one item that fails (never zero tests, never a skip)."""
    if golden_problem(EVAL_DIR, "golden.json") is not None:
        return [pytest.param("missing", "missing", id="golden.json-missing")]
    items = []
    for name, case in _spec()["cases"].items():
        for key, value in case["expected"].items():
            if key == "inception_score":
                items += [(name, f"inception_score:{split}") for split in value]
            else:
                items.append((name, key))
        if "fp16_distance_overflow_fallback" in case:
            items.append((name, "fp16_distance_overflow_fallback"))
    if not items:
        return [pytest.param("missing", "empty", id="golden.json-empty")]
    return [pytest.param(c, i, id=f"{c}-{i}") for c, i in items]


@functools.cache
def _arrays(file: str) -> dict[str, np.ndarray]:
    with np.load(EVAL_DIR / file) as data:
        return {k: data[k] for k in data.files}


def _features(file: str, name: str) -> np.ndarray:
    return _arrays(file)[name].astype(np.float32)  # README: cast every feature array to float32


def _pair(case: dict, metric: str) -> str:
    names = _arrays(case["file"]).keys()
    for family in FEATURE_PAIR[metric]:
        if f"ref_{family}" in names and f"sample_{family}" in names:
            return family
    raise AssertionError(f"no ref_/sample_ pair for {metric} among {sorted(names)}")


@functools.cache
def _stats(file: str, name: str):
    return compute_statistics(_features(file, name))


@functools.cache
def _precision_recall(file: str, family: str):
    return precision_recall(_features(file, f"ref_{family}"), _features(file, f"sample_{family}"))


def _close(got, expected, tol: dict) -> None:
    torch.testing.assert_close(
        torch.as_tensor(np.asarray(got), dtype=torch.float64),
        torch.as_tensor(np.asarray(expected), dtype=torch.float64),
        rtol=tol["rtol"],
        atol=tol["atol"],
    )


def _expected_array(case: dict, key: str) -> tuple[np.ndarray, str]:
    """Compute an expected array from its input in the same file: `out_X` <- resize of `img_X`;
    otherwise the one input array, a PyTorch-layout mixed_6/conv tensor [N, 192, 17, 17]."""
    arrays = _arrays(case["file"])
    target = arrays[key]
    if key.startswith("out_"):
        image = torch.from_numpy(arrays["img_" + key.removeprefix("out_")])  # [N, H, W, 3] uint8
        x = image.float().permute(0, 3, 1, 2)
        got = tf1_resize_bilinear(x, tuple(target.shape[1:3])).permute(0, 2, 3, 1)
        return got.numpy(), "resize"
    inputs = [k for k in arrays if k not in case["expected"]]
    assert len(inputs) == 1, f"cannot tell the input of {key} among {inputs}"
    mixed_6_conv = torch.from_numpy(arrays[inputs[0]])
    assert mixed_6_conv.shape[1:] == (192, 17, 17), mixed_6_conv.shape
    return spatial_features(mixed_6_conv).numpy(), "layout"


@pytest.mark.parametrize(("case_name", "item"), _items())
def test_golden_eval(case_name: str, item: str) -> None:
    if case_name == "missing":
        problem = golden_problem(EVAL_DIR, "golden.json")
        pytest.fail(problem or f"{EVAL_DIR / 'golden.json'} lists no case ({item})")
    spec = _spec()
    case, tolerances = spec["cases"][case_name], spec["tolerances"]
    file, expected = case["file"], case["expected"]
    if item in ("fid", "sfid"):
        family = _pair(case, item)
        got = frechet_distance(_stats(file, f"sample_{family}"), _stats(file, f"ref_{family}"))
        _close(got, expected[item], tolerances[item])
    elif item in ("precision", "recall"):
        result = _precision_recall(file, _pair(case, item))
        _close(getattr(result, item), expected[item], tolerances[item])
    elif item == "fp16_distance_overflow_fallback":
        metric = "precision" if "precision" in expected else "fid"
        result = _precision_recall(file, _pair(case, metric))
        assert result.fp16_fallback == case[item]
    elif item.startswith("inception_score:"):
        split = item.split(":")[1]
        scores = inception_score_splits(_features(file, "sample_logits"), int(split))
        if "n_splits" in case:
            assert len(scores) == case["n_splits"][split]
        _close(scores.mean(), expected["inception_score"][split], tolerances["inception_score"])
    elif expected[item] == ARRAY_IN_FILE:
        got, kind = _expected_array(case, item)
        target = _arrays(file)[item]
        assert got.shape == target.shape and got.dtype == target.dtype
        _close(got, target, tolerances[kind])
    else:
        pytest.fail(f"unknown expected entry {item!r} in case {case_name}")
