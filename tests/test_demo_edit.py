"""`adm demo --edit` on a few images, and the editing scores (seam, masked error)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from adm.cli import demo_edit
from adm.cli import main as cli
from adm.data import fashion_mnist
from adm.evaluation.edits import masked_error, seam


def test_seam_and_masked_error_on_images_with_known_answers():
    keep = np.zeros((4, 4), bool)
    keep[:, :2] = True  # left half known: the boundary lies between columns 1 and 2
    flat = np.full((1, 4, 4), 100, np.uint8)
    assert seam(flat, keep) == 0.0
    step = flat.copy()
    step[:, :, 2:] = 130  # a jump of 30 at the boundary, nothing elsewhere
    assert seam(step, keep) == 30.0
    assert masked_error(step, flat, keep) == (30.0, 30.0)
    half = step.copy()
    half[:, :2, 2:] = 100  # half of the regenerated pixels right: |e| 0 or 30
    assert masked_error(half, flat, keep) == (15.0, pytest.approx(np.sqrt(450)))


@pytest.mark.slow  # about 7 s at load 5.6 (loading the three models dominates)
def test_edit_demo_on_two_images_writes_its_tables_grids_and_metrics(tmp_path):
    try:
        fashion_mnist.find(download=False)
    except fashion_mnist.DataError as err:
        pytest.fail(f"Fashion-MNIST is needed for the demo tests: {err}")
    settings = demo_edit.EditDemoSettings(num=2, steps=4, repaint_resample=2, repaint_jump=2,
                                          solver_steps=3, sdedit_steps=4)  # fmt: skip
    result = demo_edit.run_edit_demo(tmp_path, settings, log=lambda _: None)
    assert [r["nfe"] for r in result["inpainting"]] == [4, 3, 4 + 2 * 1]
    for row in result["inpainting"]:
        assert 0 <= row["judge_accuracy"] <= 1 and row["seam"] > 0 and row["masked_mae"] > 0
    assert result["translation"]["nfe"] == 3  # round(0.7 * 4) DDPM steps
    saved = json.loads((tmp_path / "edit_metrics.json").read_text())
    assert saved["inpainting"] == result["inpainting"]
    report = (tmp_path / "edit_report.md").read_text()
    assert "| RePaint, DDPM-4, r = 2, j = 2 | 6 |" in report and "sandal" in report
    for name, columns in (("edit_inpaint.png", 5), ("edit_sdedit.png", 2)):
        from PIL import Image

        assert Image.open(tmp_path / name).size == (2 + columns * 30, 2 + 2 * 30)


def test_edit_demo_refuses_the_guidance_demos_options_in_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    assert cli.main(["demo", "--edit", "--eta", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "adm demo --edit takes --out, --data, --weights, --device and --seed" in err
    assert err.count("\n") == 1 and not out.exists()
