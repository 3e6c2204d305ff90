"""``--auto-holdout WINDOWSxTOKENS`` (prune, compare): the size of each held-out text the auto allocation chooses
on reaches numprune.auto.holdout_windows (read back from the report's held-out record), and a bad size, or the option
on a run without the auto allocation, is refused in one line before any work."""

import json

import pytest
from hostile import refused

from numprune.cli import main


def calibration(folder) -> list[str]:
    return ["--model", str(folder), "--calib", "sotu-val", "--nsamples", "4", "--seqlen", "32", "--quiet"]


def test_prune_holds_out_the_asked_size(tiny_model_folder, tmp_path):
    out = tmp_path / "auto"
    assert main(["prune", *calibration(tiny_model_folder), "--ratio", "0.3", "--allocation", "auto",
                 "--auto-holdout", "3x16", "--out", str(out)]) == 0
    holdout = json.loads((out / "pruning_report.json").read_text())["auto_allocation"]["holdout"]
    assert {name: (held["windows"], held["seqlen"]) for name, held in holdout.items()} == {"sotu-val": (3, 16),
                                                                                            "self": (3, 16)}


def test_compare_holds_out_the_asked_size(tiny_model_folder, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "grid"
    assert main(["compare", *calibration(tiny_model_folder), "--methods", "numerical:allocation=auto,numerical",
                 "--ratios", "0.3", "--data", "sotu-val", "--eval-seqlen", "32", "--eval-windows", "1",
                 "--auto-holdout", "2x40", "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    [auto] = [row for row in rows if row["method"] == "numerical:allocation=auto"]
    # 40 tokens are capped at a calibration window less the sampling prompt: 31
    assert {name: (held["windows"], held["seqlen"]) for name, held in auto["auto_allocation"]["holdout"].items()} \
        == {"sotu-val": (2, 31), "self": (2, 31)}


@pytest.mark.parametrize("size,message", [
    ("8*256", "--auto-holdout: expected WINDOWSxTOKENS such as 8x256, got '8*256'"),
    ("8x256x2", "expected WINDOWSxTOKENS such as 8x256"),
    ("8x", "expected WINDOWSxTOKENS such as 8x256"),
    ("0x256", "--auto-holdout: needs at least 1 window of 2 or more tokens"),
    ("4x1", "--auto-holdout: needs at least 1 window of 2 or more tokens"),
    ("256", "expected WINDOWSxTOKENS such as 8x256"),
])
def test_a_bad_size_is_refused(tiny_model_folder, tmp_path, size, message):
    refused(f"held-out size {size}", message, "prune", *calibration(tiny_model_folder), "--ratio", "0.3",
            "--allocation", "auto", "--auto-holdout", size, "--out", tmp_path / "out", inputs=[tiny_model_folder])
    assert not (tmp_path / "out").exists()


def test_a_size_without_the_auto_allocation_is_refused(tiny_model_folder, tmp_path):
    message = "--auto-holdout sizes the held-out text of the auto allocation, which this run does not use"
    for case, args in (("prune's default allocation", ["prune", "--ratio", "0.3"]),
                       ("a streamed blend run", ["prune", "--ratio", "0.3", "--allocation", "blend", "--stream"]),
                       ("a compare grid without auto", ["compare", "--methods", "numerical,flap", "--ratios", "0.3"])):
        refused(case, message, *args, *calibration(tiny_model_folder), "--auto-holdout", "8x256",
                "--out", tmp_path / "out", inputs=[tiny_model_folder])
    assert not (tmp_path / "out").exists()
