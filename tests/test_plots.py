"""The PNG endpoints: decoded and checked, on a job whose trials the worker's own
JobManager wrote (no training needed to draw them)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from service.jobs.plots import strength
from tests.helpers import assert_error, client, finish_job_with_scores, npz, tiny_job, upload

RNG = np.random.default_rng(3)
TEST = RNG.integers(0, 256, (30, 3, 16, 16), dtype=np.uint8)


def png(r) -> Image.Image:  # type: ignore[no-untyped-def]
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    img.load()
    return img


def busy(img: Image.Image) -> bool:
    """Something was drawn: many distinct colours, not a blank canvas."""
    return len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 20


def test_plots_of_a_finished_job(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    scores = list(RNG.normal(1, 0.2, 30))
    scores[7] = 9.0
    trials = [("cutout", {"patch_size": 0.02, "fill": "zero", "aspect": 1.0}, -0.2, scores),
              ("cutout", {"patch_size": 0.2, "fill": "zero", "aspect": 1.0}, -0.4, scores),
              ("rotate", {"angle": 90.0}, -0.1, scores),
              ("invert", {}, 0.3, scores)]
    with client(db_url) as api:
        ds = upload(api, npz(np.moveaxis(TEST, 1, -1)), "parts.npz").json()["id"]
        job = api.post("/v1/jobs", json=tiny_job(ds, ds)).json()["id"]
        empty = png(api.get(f"/v1/jobs/{job}/plots/trials.png"))  # any time
        assert empty.width > 300
        for name in ("scores", "top"):
            assert_error(api.get(f"/v1/jobs/{job}/plots/{name}.png"), 409, "Conflict")
        finish_job_with_scores(db_url, job, trials)

        t = png(api.get(f"/v1/jobs/{job}/plots/trials.png"))
        s = png(api.get(f"/v1/jobs/{job}/plots/scores.png"))
        top = png(api.get(f"/v1/jobs/{job}/plots/top.png", params={"k": 5}))
        top16 = png(api.get(f"/v1/jobs/{job}/plots/top.png"))
        for img in (t, s, top):
            assert busy(img)
        assert t.width > 800 and s.width > 500
        assert top16.width > top.width  # 8 columns against 5
        assert top16.height > top.height  # two rows against one
        for img, name in ((t, "trials"), (s, "scores"), (top16, "top")):
            img.save(tmp_path / f"{name}.png")  # to look at: pytest --basetemp
        assert_error(api.get(f"/v1/jobs/{job}/plots/augmentation.png"), 404, "NotFound",
                     "augmentation sample")
        assert_error(api.get(f"/v1/jobs/{job}/plots/top.png", params={"k": 0}), 422,
                     "ValidationError")
        assert_error(api.get(f"/v1/jobs/{job}/plots/heatmap.png"), 422, "ValidationError")


def test_strength_is_the_patch_size_or_the_place_in_the_range() -> None:
    assert strength("cutout", {"patch_size": 0.05})[0] == "patch_size"
    name, where = strength("rotate", {"angle": 90.0})
    assert name is not None and where is not None and 0 <= where <= 1
    assert strength("invert", {}) == (None, None)
    assert strength("no-such-family", {}) == (None, None)


def test_optuna_pictures_of_the_study(db_url: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """history and slice are Optuna's own plots of the job's trials; importances need a
    one-family job (with several families only the family is common to every trial)."""
    scores = list(RNG.normal(1, 0.2, 30))
    several = [("cutout", {"patch_size": 0.02, "fill": "zero", "aspect": 1.0}, -0.2, scores),
               ("cutout", {"patch_size": 0.2, "fill": "zero", "aspect": 1.0}, -0.4, scores),
               ("cutpaste", {"patch_size": 0.05}, -0.3, scores),
               ("rotate", {"angle": 90.0}, -0.1, scores)]
    one = [("cutout", {"patch_size": p, "fill": f, "aspect": 1.0}, loss, scores)
           for p, f, loss in ((0.01, "zero", 0.1), (0.03, "noise", -0.2), (0.1, "zero", -0.5),
                              (0.3, "noise", -0.1), (0.05, "zero", -0.3), (0.2, "noise", 0.0))]
    with client(db_url) as api:
        ds = upload(api, npz(np.moveaxis(TEST, 1, -1)), "parts.npz").json()["id"]
        jobs = [api.post("/v1/jobs", json=tiny_job(ds, ds, seed=i)).json()["id"]
                for i in range(2)]
        for name in ("history", "slice", "importances"):  # nothing finished yet
            assert_error(api.get(f"/v1/jobs/{jobs[0]}/plots/{name}.png"), 409, "Conflict")
        finish_job_with_scores(db_url, jobs[0], several)
        finish_job_with_scores(db_url, jobs[1], one)
        history = png(api.get(f"/v1/jobs/{jobs[0]}/plots/history.png"))
        sliced = png(api.get(f"/v1/jobs/{jobs[0]}/plots/slice.png"))
        assert busy(history) and busy(sliced)
        assert sliced.width > history.width  # one panel per local family: cutout, cutpaste
        assert_error(api.get(f"/v1/jobs/{jobs[0]}/plots/importances.png"), 409, "Conflict",
                     "two parameters")
        importances = png(api.get(f"/v1/jobs/{jobs[1]}/plots/importances.png"))
        assert busy(importances)
        one_panel = png(api.get(f"/v1/jobs/{jobs[1]}/plots/trials.png"))
        two_panels = png(api.get(f"/v1/jobs/{jobs[0]}/plots/trials.png"))
        assert one_panel.width < two_panels.width  # no empty "other augmentations" panel
        for img, name in ((history, "history"), (sliced, "slice"),
                          (importances, "importances"), (one_panel, "trials-one-family")):
            img.save(tmp_path / f"{name}.png")  # to look at: pytest --basetemp


def test_study_of_mirrors_the_worker_parameter_names() -> None:
    from service.jobs.plots import patch_size_params, study_of

    trials = [(0, "cutout", {"patch_size": 0.05, "fill": "zero"}, -0.1),
              (1, "rotate", {"angle": 90.0}, 0.2)]
    study = study_of(trials)
    assert [t.params for t in study.trials] == [
        {"augmentation": "cutout", "cutout.patch_size": 0.05, "cutout.fill": "zero"},
        {"augmentation": "rotate", "rotate.angle": 90.0}]
    assert [t.value for t in study.trials] == [-0.1, 0.2]
    assert patch_size_params(trials) == ["cutout.patch_size"]


def test_optuna_pictures_leave_the_process_style_alone() -> None:
    import matplotlib

    from service.jobs.plots import history_png

    before = dict(matplotlib.rcParams)
    history_png([(0, "rotate", {"angle": 90.0}, 0.1), (1, "invert", {}, -0.2)])
    assert dict(matplotlib.rcParams) == before
