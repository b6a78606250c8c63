"""``python -m worker.tune`` as a user runs it: a real (small) study on real digits."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import by_selection_rule

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--train-steps", "8", "--batch-size", "16", "--width", "8", "--quiet"]


def tune(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.tune", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory,
          digits: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, Path]:
    train, test, _ = digits
    d = tmp_path_factory.mktemp("cli")
    np.savez(d / "train.npz", images=train[:, 0])  # (N, H, W)
    np.save(d / "test.npy", test.transpose(0, 2, 3, 1))  # (N, H, W, 1)
    with zipfile.ZipFile(d / "test.zip", "w") as zf:
        for i, img in enumerate(test[:12, 0]):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            zf.writestr(f"part_{11 - i:02d}.png", buf.getvalue())
    (d / "bad.npz").write_bytes(b"this is not an npz")
    return {"train": d / "train.npz", "test": d / "test.npy", "zip": d / "test.zip",
            "bad": d / "bad.npz", "dir": d}


def test_small_real_study_prints_json_and_writes_scores(files: dict[str, Path]) -> None:
    out_csv = files["dir"] / "scores.csv"
    p = tune("--train", str(files["train"]), "--test", str(files["test"]), "--n-trials", "4",
             "--augmentations", "cutout,rotate,noise", "--patch-size", "0.01", "0.3",
             "--scores-out", str(out_csv), *FAST)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["best"]["augmentation"] in {"cutout", "rotate", "noise"}
    # 4 trial-equivalents: the 3 families and one more cutout screened (the screen's
    # quarter, one equivalent), then 3 full-length trials.
    assert out["plan"]["screen"]["trials"] == 4 and out["plan"]["refine"]["trials"] == 3
    assert out["plan"]["screen"]["extra"] == ["cutout"]
    assert len(out["trials"]) == 7
    assert [t["augmentation"] for t in out["trials"][:4]] == ["cutout", "rotate", "noise",
                                                              "cutout"]
    assert [t["stage"] for t in out["trials"]] == ["screen"] * 4 + ["refine"] * 3
    assert out["best"]["number"] == by_selection_rule(out["trials"][4:])[0][1]
    assert out["selection"]["best_trial"] == out["best"]["number"]
    rows = list(csv.DictReader(out_csv.open()))
    n_test = len(np.load(files["test"]))
    assert [int(r["index"]) for r in rows] == list(range(n_test))
    assert all(np.isfinite(float(r["score"])) for r in rows)


def test_zip_names_come_back_sorted_with_the_scores(files: dict[str, Path]) -> None:
    out_csv = files["dir"] / "zip_scores.csv"
    p = tune("--train", str(files["train"]), "--test", str(files["zip"]), "--n-trials", "1",
             "--augmentations", "invert", "--scores-out", str(out_csv), *FAST)
    assert p.returncode == 0, p.stderr
    names = [r["name"] for r in csv.DictReader(out_csv.open())]
    assert names == sorted(names) and names[0] == "part_00.png" and len(names) == 12


def test_end_to_end_mode(files: dict[str, Path]) -> None:
    p = tune("--train", str(files["train"]), "--test", str(files["test"]), "--end-to-end",
             "--rounds", "3", "--objective", "st-ssad", *FAST)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["best"]["augmentation"] == "cutdiff"
    assert len(out["end_to_end"]["trajectory"]) == 3
    assert 0.005 <= out["best"]["params"]["patch_size"] <= 0.5


def test_bad_input_on_the_command_line_is_one_line_and_exit_2(files: dict[str, Path]) -> None:
    p = tune("--train", str(files["bad"]), "--test", str(files["test"]), *FAST, timeout=120)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not a valid .npz" in err[0], \
        p.stderr


@pytest.mark.parametrize("args, message", [
    (["--train", "MISSING", "--test", "TEST"], "no such file"),
    (["--train", "TRAIN", "--test", "TEST", "--augmentations", "cutout,teleport"],
     "unknown augmentation"),
    (["--train", "TRAIN", "--test", "TEST", "--patch-size", "0.5", "0.1"], "min <= max"),
    (["--train", "TRAIN", "--test", "TEST", "--contamination", "0"], "contamination"),
    (["--train", "TRAIN", "--test", "TEST", "--device", "tpu"], "device"),
])
def test_bad_input_is_one_line_and_exit_2(files: dict[str, Path], args: list[str],
                                          message: str, capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    """Each kind of bad input, through the command's ``main`` in this process (a new
    process per case would spend its time importing the engine; the test above runs the
    real command)."""
    from worker.tune import main

    sub = {"MISSING": str(files["dir"] / "nope.npz"), "TRAIN": str(files["train"]),
           "TEST": str(files["test"])}
    assert main([*[sub.get(a, a) for a in args], *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_channel_mismatch_is_refused(files: dict[str, Path]) -> None:
    rgb = files["dir"] / "rgb.npy"
    np.save(rgb, np.zeros((4, 8, 8, 3), np.uint8))
    p = tune("--train", str(files["train"]), "--test", str(rgb), *FAST, timeout=120)
    assert p.returncode == 2 and "channel" in p.stderr
