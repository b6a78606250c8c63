"""The job contract: what the API writes into ``jobs.spec`` and the worker reads back.

One pydantic model per job kind, told apart by ``kind`` (also the ``jobs.kind`` column):
:class:`TuneSpec`, a study over augmentations, and :class:`ScoreSpec`, new images scored
with a finished tuning job's detector. The API writes ``spec.model_dump(mode="json")``; the
worker validates the row with :func:`load_spec`, so a spec it cannot run fails the job with
a reason naming the field, never a ``KeyError``.

This module is also the one home of every job parameter's default and bounds: the API's
request schema, the engine's ``StudySettings``/``TrainSettings`` and the command lines
import them from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from ssad_common.strategy import DEFAULT_STRATEGY, StrategyName

ObjectiveName = Literal["dsv", "dsv-discordance", "st-ssad", "mean-distance", "mmd",
                        "tail-energy"]
#: mahalanobis: a Gaussian on the embedding (method.md §2); multilevel: one on every level of
#: the encoder's pooled features side by side (worker/core/scoring.py); logit: the margin.
ScorerName = Literal["mahalanobis", "multilevel", "logit"]
#: The detector's encoder (what each is and costs: ssad_common/detectors.py).
DetectorName = Literal["small", "resnet18"]
JobKind = Literal["tune", "score"]
JOB_KINDS: Final[tuple[JobKind, ...]] = get_args(JobKind)

DEFAULT_N_TRIALS: Final = 12
DEFAULT_OBJECTIVE: Final[ObjectiveName] = "dsv"
DEFAULT_CONTAMINATION: Final = 0.1
DEFAULT_TRAIN_STEPS: Final = 400
DEFAULT_BATCH_SIZE: Final = 64
DEFAULT_SEED: Final = 0
DEFAULT_SCORER: Final[ScorerName] = "multilevel"
DEFAULT_DETECTOR: Final[DetectorName] = "small"

#: The bounds of each parameter (the API's 422s, and what the worker accepts).
NTrials = Annotated[int, Field(ge=1)]
Contamination = Annotated[float, Field(gt=0, lt=1)]
TrainSteps = Annotated[int, Field(ge=1, le=100_000)]
BatchSize = Annotated[int, Field(ge=2, le=4096)]
Seed = Annotated[int, Field(ge=0, le=2**31 - 1)]
#: Trials of one job run at once (on as many workers); servers may cap it lower.
Parallelism = Annotated[int, Field(ge=1, le=256)]


class TuneSpec(BaseModel):
    """A tuning job as stored. Every version has written the request's fields; rows written
    before ``kind``, ``images`` and ``requested_batch_size`` existed load with the defaults
    below. Keys this model does not know (none so far) are ignored on reading."""

    kind: Literal["tune"] = "tune"
    train_dataset_id: str
    test_dataset_id: str
    n_trials: NTrials
    search_space: dict[str, Any] | None = Field(
        None, description="SearchSpace.to_dict(): the families and ranges searched")
    objective: ObjectiveName
    contamination: Contamination
    train_steps: TrainSteps
    batch_size: BatchSize = Field(description="after clamping to the train set's size")
    seed: Seed
    scorer: ScorerName = Field(
        "mahalanobis", description="rows written before the scorer was a field were scored "
                                   "by mahalanobis, hence this default for stored rows "
                                   f"(requests default to {DEFAULT_SCORER!r})")
    strategy: StrategyName = Field(
        "tpe", description="how the budget is spent (ssad_common/strategy.py); rows written "
                           "before strategies existed ran warm start + TPE, hence this "
                           "default for stored rows (requests default to "
                           f"{DEFAULT_STRATEGY!r})")
    requested_batch_size: int | None = Field(
        None, description="the request's batch_size, when it was clamped")
    detector: DetectorName = Field(
        DEFAULT_DETECTOR, description="the detector's encoder (ssad_common/detectors.py); "
                                      "rows written before the choice existed used small")
    image_size: int | None = Field(
        None, ge=16, le=256, description="the working size asked for; None: the detector's "
                                         "default for the images (images.working_size)")
    parallelism: Parallelism = Field(
        1, description="trials run at once on different workers (the jobs.parallelism "
                       "column is what claims read); rows written before it ran one")
    backbone_id: str | None = Field(
        None, description="the uploaded encoder weights every trial starts from (None: "
                          "from scratch)")
    backbone_sha256: str | None = Field(None, description="their blob, as the API found it")
    images: dict[str, Any] | None = Field(
        None, description="train and test image sizes and the working size")


class ScoreSpec(BaseModel):
    """A scoring job as stored: ``dataset_id`` scored with ``source_job_id``'s detector.
    ``threshold_reference`` (the source's thresholds, kept at creation) is None on rows
    written before references were kept."""

    kind: Literal["score"] = "score"
    source_job_id: str
    n_trials: Literal[1] = 1
    dataset_id: str
    contamination: Contamination = DEFAULT_CONTAMINATION
    threshold_reference: dict[str, Any] | None = None


JobSpec = Annotated[TuneSpec | ScoreSpec, Field(discriminator="kind")]
JOB_SPEC: TypeAdapter[TuneSpec | ScoreSpec] = TypeAdapter(JobSpec)


class InvalidJobSpec(ValueError):
    """A stored spec the worker cannot run; the message names the fields."""


def spec_dump(spec: TuneSpec | ScoreSpec) -> dict[str, Any]:
    """The JSON the ``jobs.spec`` column holds (unset optional keys left out, as before)."""
    return spec.model_dump(mode="json", exclude_none=True)


def load_spec(kind: str, stored: Mapping[str, Any]) -> TuneSpec | ScoreSpec:
    """Validate a stored spec as the job's ``kind`` (the column: tuning specs written before
    it existed do not say their kind)."""
    try:
        return JOB_SPEC.validate_python({**stored, "kind": kind})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc'][1:]) or 'kind'}: {e['msg']}"
            for e in exc.errors())
        raise InvalidJobSpec(f"the job's spec cannot be run ({problems})") from None
