"""The job contract (ssad_common/jobspec.py): what the API writes, what the worker accepts, and
the specs earlier versions stored."""

from __future__ import annotations

import pytest

from ssad_common.jobspec import (
    InvalidJobSpec,
    ScoreSpec,
    TuneSpec,
    load_spec,
    spec_dump,
)

#: A tuning spec as the first version wrote it: the request's fields, no kind, no images.
FIRST_TUNE_SPEC = {"train_dataset_id": "a", "test_dataset_id": "b", "n_trials": 3,
                   "search_space": {"augmentations": ["rotate"]}, "objective": "mmd",
                   "contamination": 0.2, "train_steps": 40, "batch_size": 8, "seed": 5,
                   "scorer": "logit"}
#: A scoring spec as written before thresholds references were kept.
FIRST_SCORE_SPEC = {"kind": "score", "source_job_id": "s", "n_trials": 1, "dataset_id": "d",
                    "contamination": 0.05}


def test_specs_stored_by_earlier_versions_still_load() -> None:
    tune = load_spec("tune", FIRST_TUNE_SPEC)
    assert isinstance(tune, TuneSpec)
    assert (tune.n_trials, tune.objective, tune.contamination, tune.train_steps,
            tune.batch_size, tune.seed, tune.scorer) == (3, "mmd", 0.2, 40, 8, 5, "logit")
    assert tune.images is None and tune.requested_batch_size is None
    no_scorer = {k: v for k, v in FIRST_TUNE_SPEC.items() if k != "scorer"}
    assert load_spec("tune", no_scorer).scorer == "mahalanobis"  # what those rows ran
    score = load_spec("score", FIRST_SCORE_SPEC)
    assert isinstance(score, ScoreSpec)
    assert (score.source_job_id, score.dataset_id, score.contamination,
            score.threshold_reference) == ("s", "d", 0.05, None)


def test_a_spec_that_cannot_run_names_its_fields() -> None:
    with pytest.raises(InvalidJobSpec) as missing:
        load_spec("tune", {"n_trials": 1, "objective": "dsv"})
    for field in ("train_dataset_id", "contamination", "train_steps", "batch_size", "seed"):
        assert f"{field}: Field required" in str(missing.value)
    assert "n_trials" not in str(missing.value) and "objective" not in str(missing.value)
    with pytest.raises(InvalidJobSpec, match=r"n_trials: Input should be greater than or"):
        load_spec("tune", {**FIRST_TUNE_SPEC, "n_trials": 0})
    with pytest.raises(InvalidJobSpec, match=r"objective: Input should be 'dsv'"):
        load_spec("tune", {**FIRST_TUNE_SPEC, "objective": "accuracy"})
    with pytest.raises(InvalidJobSpec, match=r"\(source_job_id: Field required\)"):
        load_spec("score", {"dataset_id": "d"})


def test_the_kind_column_decides_which_contract_applies() -> None:
    """A spec's own ``kind`` key (or its absence) does not override the job's column."""
    with pytest.raises(InvalidJobSpec, match="source_job_id: Field required"):
        load_spec("score", FIRST_TUNE_SPEC)
    with pytest.raises(InvalidJobSpec, match="train_dataset_id: Field required"):
        load_spec("tune", FIRST_SCORE_SPEC)
    with pytest.raises(InvalidJobSpec, match="kind"):
        load_spec("train", FIRST_TUNE_SPEC)


def test_what_is_written_reads_back_the_same() -> None:
    tune = load_spec("tune", {**FIRST_TUNE_SPEC, "requested_batch_size": 64,
                              "images": {"train": [8, 8], "test": [8, 8], "working_size": 32}})
    stored = spec_dump(tune)
    assert stored["kind"] == "tune" and stored["requested_batch_size"] == 64
    assert load_spec("tune", stored) == tune
    assert "requested_batch_size" not in spec_dump(load_spec("tune", FIRST_TUNE_SPEC))
    assert "threshold_reference" not in spec_dump(load_spec("score", FIRST_SCORE_SPEC))
