"""The golden harness itself (`test_golden.py`) and where the golden cases come from: the folder
choice, a clear failure for a missing or empty case set, labels for class-conditional networks,
sampler loops read from output names, and the checks that every array is accounted for.

The numbers against the original live in the golden tests; these check the plumbing, on the
repository's own copy of the cases (whatever `ADM_GOLDEN_DIR` says).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import test_golden as harness
from adm.diffusion.gaussian import Diffusion
from adm.models import flags
from conftest import GOLDEN_ENV, REPO_ROOT, golden_cases, golden_dir, golden_problem, randomize

REPO_GOLDEN = REPO_ROOT / "tests" / "golden"
GOLDEN_TEST_FILES = [
    "tests/test_golden.py",
    "tests/test_evaluate_golden.py",
    "tests/test_unet.py",
    "tests/test_classifier.py",
    "tests/test_nn.py",
]


# ---- where the cases come from -----------------------------------------------------------------


def test_golden_dir_is_the_repository_copy_unless_overridden(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv(GOLDEN_ENV, raising=False)
    assert golden_dir() == REPO_GOLDEN
    monkeypatch.setenv(GOLDEN_ENV, "")
    assert golden_dir() == REPO_GOLDEN
    monkeypatch.setenv(GOLDEN_ENV, str(tmp_path))
    assert golden_dir() == tmp_path


def test_repository_holds_a_case_of_every_kind() -> None:
    """A fresh clone carries the whole reference set: every kind, each json with its npz."""
    cases = sorted(REPO_GOLDEN.glob("*.json"))
    assert all(p.with_suffix(".npz").is_file() for p in cases)
    assert {json.loads(p.read_text())["kind"] for p in cases} == set(harness.CHECKERS)
    eval_spec = json.loads((REPO_GOLDEN / "eval" / "golden.json").read_text())
    assert all((REPO_GOLDEN / "eval" / c["file"]).is_file() for c in eval_spec["cases"].values())


def test_an_override_selects_its_own_cases(monkeypatch, tmp_path) -> None:
    for suffix in (".json", ".npz"):
        shutil.copy(REPO_GOLDEN / f"primitives{suffix}", tmp_path)
    monkeypatch.setenv(GOLDEN_ENV, str(tmp_path))
    assert golden_problem() is None
    assert harness._case_paths() == [tmp_path / "primitives.json"]
    assert golden_cases("primitives") == ["primitives"]
    assert golden_cases("unet_forward") == []  # other kinds: none here (the set is not empty)


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_a_missing_or_empty_case_set_is_a_failing_parameter(monkeypatch, tmp_path, state) -> None:
    folder = tmp_path / "golden"
    if state == "empty":
        folder.mkdir()
    monkeypatch.setenv(GOLDEN_ENV, str(folder))
    problem = golden_problem()
    assert problem is not None and f"{GOLDEN_ENV}={folder}" in problem
    assert [p.id for p in golden_cases("unet_forward")] == ["golden-cases-missing"]
    assert [p.id for p in harness._case_paths()] == ["golden-cases-missing"]


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_golden_run_without_cases_fails_and_names_the_folder(tmp_path, state) -> None:
    """`ADM_GOLDEN_DIR=<missing or empty> pytest -m golden` fails (never passes or skips)."""
    folder = tmp_path / "golden"
    if state == "empty":
        folder.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "golden",
         *GOLDEN_TEST_FILES],
        cwd=REPO_ROOT, env={**os.environ, GOLDEN_ENV: str(folder)},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 1, run.stdout[-3000:]
    assert "failed" in summary and "passed" not in summary and "skipped" not in summary
    assert f"{GOLDEN_ENV}={folder}" in run.stdout
    assert "golden.json" in run.stdout  # the evaluator cases fail too


# ---- labels, loops and accounting ---------------------------------------------------------------


def _fake_net(num_classes: int | None, calls: list):
    def net(x, t, **kwargs):
        calls.append(kwargs)
        return x

    net.config = SimpleNamespace(num_classes=num_classes)
    return net


def test_model_fn_passes_labels_to_class_conditional_networks_only() -> None:
    calls: list = []
    x, t, y = torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([4, 5])
    harness.model_fn_for(_fake_net(10, calls), y)(x, t, y=torch.tensor([9, 9]))
    assert calls[-1].keys() == {"y"} and torch.equal(calls[-1]["y"], y)
    harness.model_fn_for(_fake_net(None, calls), y)(x, t, y=y)  # guidance: y is for cond_fn
    assert calls[-1] == {}
    with pytest.raises(pytest.fail.Exception, match="class-conditional network"):
        harness.model_fn_for(_fake_net(10, calls), None)


def test_labels_are_read_for_each_batch() -> None:
    arrays = {"input/y": np.array([1, 2, 3]), "input/bpd_y": np.array([4, 5])}
    case = harness.Case("c", {"arrays": {}}, arrays)
    assert case.labels(3).tolist() == [1, 2, 3]
    assert case.labels(2, "bpd").tolist() == [4, 5]
    assert case.labels(3, "other").tolist() == [1, 2, 3]
    with pytest.raises(pytest.fail.Exception, match="input/y has shape"):
        case.labels(2)
    assert harness.Case("c", {"arrays": {}}, {}).labels(2) is None


def test_an_unknown_loop_option_fails() -> None:
    case = harness.Case("c", {"arrays": {}}, {})
    with pytest.raises(pytest.fail.Exception, match="unknown option 'foo'"):
        harness.sampler_loop(case, "ddim_loop_foo", lambda x, t: x, torch.zeros(1))


def test_verify_accounts_for_every_array() -> None:
    meta = {
        "arrays": {"input/a": {}, "output/b": {}},
        "tolerances": {"output/b": {"rtol": 0.0, "atol": 1e-6}},
    }
    arrays = {"input/a": np.zeros(2, np.float32), "output/b": np.ones(2, np.float32)}

    def case(read: bool = True) -> harness.Case:
        c = harness.Case("c", meta, arrays)
        if read:
            c["input/a"]
        return c

    ones = torch.ones(2)
    harness.verify(case(), {"output/b": ones, "debug/tap": ones})  # unlisted debug taps are fine
    with pytest.raises(AssertionError, match="outputs no checker produces"):
        harness.verify(case(), {})
    with pytest.raises(AssertionError, match="does not list"):
        harness.verify(case(), {"output/b": ones, "output/c": ones})
    with pytest.raises(AssertionError, match="never used"):
        harness.verify(case(read=False), {"output/b": ones})
    with pytest.raises(AssertionError, match="output/b"):
        harness.verify(case(), {"output/b": ones + 1e-3})


def _class_conditional_samplers_case() -> tuple[dict, dict]:
    """The public `samplers` case made class-conditional (1000 classes, seeded weights), cut to
    batch 1 and 4-step loops, with a DDIM loop at η = ddim_eta on stored noise. The expected
    outputs are the harness's own: this checks the plumbing, the golden tests the numbers."""
    public = harness.Case.load(REPO_GOLDEN / "samplers.json")
    meta = copy.deepcopy(public.meta)
    for name, respacing in (("ddpm", "4"), ("ddim", "ddim4")):
        diff = meta["diffusions"][name]
        diff["create_gaussian_diffusion"]["timestep_respacing"] = respacing
        config = flags.diffusion_from_flags(diff["create_gaussian_diffusion"])
        schedule = Diffusion.from_config(config).schedule
        diff["resolved"]["timestep_map"] = schedule.timestep_map.tolist()
    spec = meta["models"]["model"]
    spec["kwargs"]["num_classes"], spec["create_flags"]["class_cond"] = 1000, True
    config = flags.config_from_constructor("UNetModel", spec["kwargs"])
    net = randomize(flags.build_network("UNetModel", config), seed=3)
    spec["state_dict_keys"] = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    spec["num_parameters"] = sum(p.numel() for p in net.parameters())
    arrays = {f"model/{k}": v.numpy() for k, v in net.state_dict().items()}
    for name, value in public.arrays.items():
        if name.startswith("input/"):
            arrays[name] = value[:4, :1] if name.endswith("_loop_noises") else value[:1]
    arrays["input/t_step"], arrays["input/t_ddim_step"] = np.array([2]), np.array([3])
    arrays["input/y"] = np.array([7])
    arrays["input/ddim_loop_noises"] = arrays["input/ddpm_loop_noises"][::-1].copy()
    for kind in ("samples", "pred_xstart"):
        meta["arrays"][f"output/ddim_loop_eta/{kind}"] = meta["arrays"][f"output/ddpm_loop/{kind}"]
        meta["tolerances"][f"output/ddim_loop_eta/{kind}"] = meta["tolerances"][
            f"output/ddpm_loop/{kind}"
        ]
    meta["arrays"]["input/y"] = meta["arrays"]["input/ddim_loop_noises"] = {}
    computed = harness.check_samplers(harness.Case("synthetic", meta, arrays))
    arrays.update({k: v.numpy() for k, v in computed.items() if k in meta["arrays"]})
    return meta, arrays


def test_harness_gives_sampler_loops_labels_and_stored_noise() -> None:
    meta, arrays = _class_conditional_samplers_case()
    assert {"output/ddim_loop_eta/samples", "output/ddpm_loop/samples"} <= set(meta["arrays"])
    case = harness.Case("synthetic", meta, arrays)
    build, labels = case.network, []

    def network(name: str) -> torch.nn.Module:
        net = build(name)
        net.register_forward_pre_hook(lambda _m, _a, kw: labels.append(kw["y"]), with_kwargs=True)
        return net

    case.network = network
    harness.verify(case, harness.check_samplers(case))
    assert len(labels) == 4 + 4 * 4 and all(y.tolist() == [7] for y in labels)  # steps, 4 loops
    noises = {**arrays, "input/ddim_loop_noises": arrays["input/ddpm_loop_noises"]}
    other_noise = harness.Case("other noise", meta, noises)
    with pytest.raises(AssertionError, match="ddim_loop_eta"):
        harness.verify(other_noise, harness.check_samplers(other_noise))
    no_labels = harness.Case("no labels", meta, {k: v for k, v in arrays.items() if k != "input/y"})
    with pytest.raises(pytest.fail.Exception, match="class-conditional network"):
        harness.check_samplers(no_labels)
