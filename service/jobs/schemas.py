from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.params import ID_DESCRIPTION, ID_PATTERN
from service.webhooks import NotifyUrl
from ssad_common.jobspec import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONTAMINATION,
    DEFAULT_DETECTOR,
    DEFAULT_N_TRIALS,
    DEFAULT_OBJECTIVE,
    DEFAULT_SCORER,
    DEFAULT_SEED,
    DEFAULT_TRAIN_STEPS,
    BatchSize,
    Contamination,
    DetectorName,
    NTrials,
    ObjectiveName,
    Parallelism,
    ScorerName,
    Seed,
    TrainSteps,
)
from ssad_common.strategy import DEFAULT_STRATEGY, TRUST_AGREEMENT, StrategyName, Trust


class SearchSpaceIn(BaseModel):
    """Which families to search and (optionally) the patch-size range of the local ones."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "augmentations": ["cutout", "cutpaste", "rotate"], "patch_size": [0.01, 0.3]}})

    augmentations: list[str] | None = Field(
        None, min_length=1, max_length=64,
        description="family names (GET /v1/augmentations); default: all but cutdiff")
    patch_size: tuple[float, float] | None = Field(
        None, description="[min, max] patch area fraction, within [0.001, 1]")
    fixed: dict[str, dict[str, float | str]] | None = Field(
        None, description="hold some hyperparameters of a family fixed, e.g. "
                          "{\"cutout\": {\"fill\": \"zero\"}}")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "train_dataset_id": "0b6f9c1e-2a51-4c1e-9a4e-5f3d2b7c8a10",
        "test_dataset_id": "7d0e4a52-8c3b-41f0-b7a4-6c9e1f2d3b45",
        "n_trials": 12, "search_space": {"augmentations": ["cutout", "rotate"],
                                         "patch_size": [0.01, 0.3]},
        "objective": "dsv", "contamination": 0.1, "train_steps": 400, "seed": 0}})

    train_dataset_id: str = Field(max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
    test_dataset_id: str = Field(max_length=64, pattern=ID_PATTERN, description=ID_DESCRIPTION)
    n_trials: NTrials = Field(
        DEFAULT_N_TRIALS,
        description="the study's budget in full-length trials (trial-equivalents): "
                    "n_trials × train_steps training steps in all. The staged strategy "
                    "spends part of it on short screen trials, so it runs more, shorter "
                    "trials; the job's `plan` says how many")
    strategy: StrategyName = Field(
        DEFAULT_STRATEGY,
        description="staged: a short screen of every family at its defaults, and of more "
                    "configurations of each when the space is small (at least a quarter of "
                    "the budget, at most half), then full-length trials over the leading "
                    "families, from their best screened configuration, and the best local "
                    "family's patch size; only full-length trials can be chosen. tpe: one "
                    "full-length trial per family at its defaults, then TPE over all")
    search_space: SearchSpaceIn | None = None
    objective: ObjectiveName = DEFAULT_OBJECTIVE
    contamination: Contamination = Field(
        DEFAULT_CONTAMINATION,
        description="expected anomaly fraction of the test set; it sets |Y| = |X|·r/(1−r) "
                    "augmented images per trial, which must stay within the server's "
                    "SSAD_MAX_AUGMENTED_IMAGES (422 otherwise)")
    train_steps: TrainSteps = Field(DEFAULT_TRAIN_STEPS,
                                    description="detector training steps per trial (the "
                                                "server's SSAD_MAX_TRAIN_STEPS may cap it "
                                                "lower)")
    batch_size: BatchSize = Field(DEFAULT_BATCH_SIZE,
                                  description="clamped to the train set's size (the job's "
                                              "spec then shows requested_batch_size too); "
                                              "n_trials × train_steps × batch_size must fit "
                                              "the tenant's compute quota (403 otherwise)")
    seed: Seed = DEFAULT_SEED
    scorer: ScorerName = Field(
        DEFAULT_SCORER,
        description="how a trained detector scores an image: multilevel (the Mahalanobis "
                    "distance under a Ledoit-Wolf Gaussian fitted on the train images' "
                    "encoder features after the stem and after every block, side by side), "
                    "mahalanobis (the same on the embedding only) or logit (the "
                    "classifier's 'augmented' margin). The scorer changes the scores (and "
                    "so the trust verdict and ensembles, which read them), not which trial "
                    "is chosen")
    detector: DetectorName = Field(
        DEFAULT_DETECTOR,
        description="the detector trained in each trial: small (a 16-wide ResNet whose stem "
                    "brings every image to 32 px; sized for a CPU) or resnet18 (ResNet-18 "
                    "from scratch at 128-256 px, DSV's protocol; sized for a GPU: about "
                    "141× the small one's compute per image at 224 px, which the compute "
                    "quota counts)")
    image_size: int | None = Field(
        None, ge=16, le=256,
        description="working size (px) every image is resized to; default: small 32, 64 "
                    "or 128 from the train images' size, resnet18 224 for images of at "
                    "least 224 px, else 128. resnet18 takes 128-256 (422 otherwise)")
    parallelism: Parallelism | None = Field(
        None, description="how many of the job's trials may run at once, each on its own "
                          "worker, all in one Optuna study (Katib's parallelTrialCount); "
                          "default: the server's SSAD_DEFAULT_PARALLELISM (1 unless set); "
                          "at most SSAD_MAX_PARALLELISM (422 beyond it). More workers "
                          "finish a job sooner; TPE then draws a few points knowing only "
                          "that the others are running (constant liar)")
    notify_url: NotifyUrl = None
    backbone_id: str | None = Field(
        None, max_length=64, pattern=ID_PATTERN,
        description="start every trial's detector from these uploaded encoder weights "
                    "(POST /v1/backbones) instead of from scratch; they must fit the job's "
                    "detector, working size and channels (the job fails, saying why, if not)")


class TrialProgress(BaseModel):
    """The trial running now, as its worker last reported it (about once a second)."""

    number: int = Field(description="the trial's number (as in /trials)")
    step: int = Field(description="training steps done")
    steps: int = Field(description="training steps in all (the job's train_steps)")
    loss: float | None = Field(description="training loss (cross-entropy) at that step")
    at: datetime | None = Field(None, description="when the worker reported it")


class Progress(BaseModel):
    n_trials: int = Field(description="the budget, in full-length trials")
    trials_completed: int
    trials_planned: int | None = Field(
        None, description="trials the plan runs (screen + refine); null for scoring jobs")
    train_steps_done: int = Field(0, description="training steps of the finished trials")
    train_steps_planned: int | None = Field(
        None, description="training steps the plan runs in all (at most n_trials × "
                          "train_steps)")
    estimated_remaining_s: float | None = Field(
        None, description="the plan's remaining training steps at the pace of the job's "
                          "finished trials; null before the first trial ends")
    current_trial: TrialProgress | None = Field(
        None, description="while a trial trains: its step and latest training loss (with "
                          "parallel trials, the one whose worker reported last)")


class ScreenPlan(BaseModel):
    trials: int
    train_steps_each: int
    families: list[str] = Field(description="screened at their defaults, in this order")
    extra: list[str] = Field(
        default_factory=list,
        description="then one more configuration of each of these families (another fill "
                    "or direction; the patch size and other numbers drawn at random): the "
                    "screen's quarter of the budget, when the families alone cost less")


class RefinePlan(BaseModel):
    trials: int
    train_steps_each: int


class PlanOut(BaseModel):
    """How the study spends its budget (ssad_common/strategy.py), fixed when the job is
    created."""

    strategy: StrategyName
    budget_trial_equivalents: int
    budget_train_steps: int
    planned_train_steps: int
    screen: ScreenPlan = Field(description="staged: short trials, one per family at its "
                                           "defaults, and more configurations of a small "
                                           "space's families; tpe: the full-length warm "
                                           "start")
    refine: RefinePlan = Field(description="full-length trials over the leading families "
                                           "(staged) or all families (tpe)")
    skipped_families: list[str] = Field(
        description="families of the search space the budget cannot screen: never tried")


class SelectionOut(BaseModel):
    """How decisive the choice was, without labels (worker/core/selection.py): a low
    agreement (``trust: uncertain``) says the tuned detector may be no better than its
    runner-up; the family gap says how close the runner-up family came."""

    best_trial: int
    best_family: str
    runner_up_family: str | None = Field(description="the best other family among the "
                                                     "candidates (full-length trials)")
    runner_up_trial: int | None
    family_gap: float | None = Field(
        description="the runner-up family's best rank sum − the best trial's (rank sum: "
                    "the rank under the objective's loss plus the rank under MMD among the "
                    "candidates; the best has the lowest)")
    family_gap_unit: Literal["rank points", "loss"] | None = Field(
        None, description="what family_gap counts: `rank points` (rank sums, as above); "
                          "`loss`, the objective's loss, for jobs that finished before "
                          "2026-12-01 or from 2026-12-02 to 03, when the best trial was "
                          "the lowest loss, whose gap is the loss difference")
    family_gap_share: float | None = Field(
        description="family_gap / (largest − smallest candidate score)")
    top_k: int
    top_trials: list[int]
    flagged_share: float = Field(description="the contamination: each of the top_k flags "
                                             "this share of the test images")
    agreement_jaccard: float | None = Field(
        description="mean Jaccard overlap of the best's flagged images with each other top "
                    "trial's; 1 = they flag the same images")
    agreement_spearman: float | None = Field(
        description="mean Spearman correlation of the best's scores with each other top "
                    "trial's")
    candidates: int
    trust: Trust | None = Field(
        None, description=f"the verdict: `decisive` when agreement_jaccard ≥ "
                          f"{TRUST_AGREEMENT} (the top configurations flag mostly the same "
                          "images), `uncertain` below it: the tuned detector may be no "
                          "better than a default, and `GET /v1/jobs/{id}/scores?ensemble=3` "
                          "is the hedge; null with one candidate. The threshold and its "
                          "held-out record: docs/benchmarks.md §7")


#: The v1 field ``augmentation`` names an augmentation *family* (cutout, rotate, ...); the
#: family and its ``params`` together are the augmentation a trial trained with.
FamilyName = Annotated[str, Field(description="the augmentation family "
                                  "(GET /v1/augmentations); `params` holds its hyperparameters")]


class Best(BaseModel):
    augmentation: FamilyName
    params: dict[str, Any]
    validation_loss: float
    trial_number: int


class JobOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "id": "3f1c…", "status": "running", "created_at": "2026-11-29T12:00:00Z",
        "started_at": "2026-11-29T12:00:01Z", "finished_at": None,
        "progress": {"n_trials": 12, "trials_completed": 5,
                     "current_trial": {"number": 5, "step": 120, "steps": 400,
                                       "loss": 0.412, "at": "2026-11-29T12:04:31Z"}},
        "best": {"augmentation": "rotate", "params": {"angle": 90.0},
                 "validation_loss": -0.57, "trial_number": 3},
        "error": None, "attempt": 1}})

    id: str
    kind: Literal["tune", "score"] = Field(
        "tune", description="tune: a study over augmentations; score: new images scored "
                            "with a finished job's detector (POST /v1/jobs/{id}/score)")
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    progress: Progress
    best: Best | None
    error: str | None
    attempt: int = Field(description="claims by a worker so far (a clean hand-back and a "
                                     "re-claim make a new attempt)")
    lost_leases: int = Field(0, description="attempts whose worker stopped responding; the "
                                            "job fails once these reach SSAD_MAX_ATTEMPTS")
    cancel_requested: bool
    train_dataset_id: str
    test_dataset_id: str
    plan: PlanOut | None = Field(None, description="tuning jobs: how the budget is spent")
    selection: SelectionOut | None = Field(
        None, description="succeeded tuning jobs: how decisive the choice was")
    notify_url: str | None = Field(None, description="where the job's end is notified "
                                                     "(GET /v1/jobs/{id}/deliveries)")
    report_url: str = Field(description="the job's HTML report (GET /v1/jobs/{id}/report; "
                                        "for a browser with keys on: POST /v1/jobs/{id}/"
                                        "report-link)")
    spec: dict[str, Any]


class JobSummary(JobOut):
    """A job as ``GET /v1/jobs`` lists it: every field of :class:`JobOut`, with ``spec``
    null unless the list was asked for it (``?include=spec``)."""

    spec: dict[str, Any] | None = Field(  # type: ignore[assignment]
        None, description="the job's spec: only with ?include=spec (always on GET "
                          "/v1/jobs/{id})")


class JobList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"items": [{
        "id": "3f1c…", "kind": "tune", "status": "succeeded",
        "created_at": "2026-11-29T12:00:00Z", "started_at": "2026-11-29T12:00:01Z",
        "finished_at": "2026-11-29T12:09:40Z", "progress": {"n_trials": 12,
                                                            "trials_completed": 12},
        "best": {"augmentation": "cutout", "params": {"patch_size": 0.04, "aspect": 1.0,
                                                      "fill": "zero",
                                                      "placement": "object"},
                 "validation_loss": -0.61, "trial_number": 7},
        "error": None, "attempt": 1, "cancel_requested": False,
        "train_dataset_id": "0b6f…", "test_dataset_id": "7d0e…", "spec": None}],
        "total": 1}})

    items: list[JobSummary]
    total: int


class TrialOut(BaseModel):
    number: int
    state: Literal["COMPLETE", "FAIL"]
    augmentation: FamilyName
    params: dict[str, Any]
    validation_loss: float | None
    losses: dict[str, float]
    duration_s: float
    attempt: int
    error: str | None = Field(None, description="why a FAIL trial failed")
    stage: Literal["screen", "refine"] | None = Field(
        None, description="staged strategy: screen (short; chosen only if no full-length "
                          "trial completed) or refine; null for the tpe strategy and for "
                          "trials stored before stages existed")
    train_steps: int | None = Field(None, description="how long its detector trained")
    worker: str | None = Field(None, description="the worker that ran it (host:pid:id); "
                                                 "null for trials stored before this was kept")
    started_at: datetime | None = Field(None, description="when its worker started it")
    finished_at: datetime | None = Field(None, description="when its result was stored")


class TrialList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"job_id": "3f1c…", "trials": [
        {"number": 0, "state": "COMPLETE", "augmentation": "cutout",
         "params": {"patch_size": 0.05, "aspect": 1.0, "fill": "zero",
                    "placement": "object"},
         "validation_loss": -0.42, "losses": {"dsv": -0.42, "mmd": 0.03}, "duration_s": 41.8,
         "attempt": 1, "error": None, "worker": "gpu-3:412:9c1e2a",
         "started_at": "2026-11-29T12:00:02Z", "finished_at": "2026-11-29T12:00:44Z"},
        {"number": 1, "state": "FAIL", "augmentation": "cutpaste", "params": {},
         "validation_loss": None, "losses": {}, "duration_s": 0.0, "attempt": 1,
         "error": "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB); a "
                  "smaller batch_size … would fit"}]}})

    job_id: str
    trials: list[TrialOut]


class ScoreItem(BaseModel):
    index: int
    name: str
    score: float


class ScoresOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "job_id": "3f1c…", "trial_number": 7, "scores": [
            {"index": 0, "name": "part_0000.png", "score": 3.12},
            {"index": 1, "name": "part_0001.png", "score": 9.87}]}})

    job_id: str
    trial_number: int = Field(description="the best trial (also with ?ensemble=k)")
    ensemble_trials: list[int] | None = Field(
        None, description="with ?ensemble=k: the trials averaged, best first")
    scores: list[ScoreItem]


class EventOut(BaseModel):
    at: datetime
    status: str
    attempt: int
    message: str | None


class EventList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"job_id": "3f1c…", "events": [
        {"at": "2026-11-29T12:00:00Z", "status": "queued", "attempt": 0,
         "message": "queued"},
        {"at": "2026-11-29T12:00:01Z", "status": "running", "attempt": 1,
         "message": "claimed by gpu-3:4121:a1b2c3"},
        {"at": "2026-11-29T12:09:40Z", "status": "succeeded", "attempt": 1,
         "message": "best trial 7: cutout (loss -0.61)"}]}})

    job_id: str
    events: list[EventOut]


class ThresholdRule(BaseModel):
    rule: Literal["mad", "contamination"]
    threshold: float
    n_flagged: int
    description: str


class ThresholdOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "job_id": "3f1c…", "trial_number": 4, "reference": "tuning",
        "reference_job_id": "3f1c…", "suggested_rule": "mad", "rule": "mad",
        "rules": [{"rule": "mad", "threshold": 41.2, "n_flagged": 17,
                   "description": "median + 3.5 x 1.4826 x MAD of the scores"},
                  {"rule": "contamination", "threshold": 37.9, "n_flagged": 20,
                   "description": "the top 0.1 of the test set (20 of 200 images)"}],
        "flagged": [{"index": 12, "name": "part_0012.png", "score": 88.1}]}})

    job_id: str
    trial_number: int
    reference: Literal["tuning", "batch"] = Field(
        description="tuning: the thresholds come from the tuning job's best trial's scores "
                            "on its test set; batch: from this job's own scores")
    reference_job_id: str | None = Field(
        None, description="the job whose scores set the thresholds")
    suggested_rule: Literal["mad", "contamination"]
    rule: Literal["mad", "contamination"] = Field(description="the rule `flagged` follows")
    rules: list[ThresholdRule]
    flagged: list[ScoreItem] = Field(description="images above the rule's threshold, "
                                                 "most anomalous first")


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"example": {
        "dataset_id": "9a1d3c4e-6f70-4b8a-9c1d-2e3f4a5b6c7d"}})

    dataset_id: str = Field(max_length=64, pattern=ID_PATTERN,
                            description="the new images (POST /v1/datasets); "
                                        "grey or RGB like the job's train set")
    notify_url: NotifyUrl = None


class ReportLink(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {
        "url": "http://127.0.0.1:8000/v1/jobs/3f1c…/report?token=1764590400.Xk3…",
        "path": "/v1/jobs/3f1c…/report?token=1764590400.Xk3…",
        "expires_at": "2026-12-02T12:00:00Z"}})

    url: str = Field(description="open it in a browser; anyone holding it can read the job")
    path: str = Field(description="the same, relative to the server (behind a proxy that "
                                  "rewrites the host, prefix your public address)")
    expires_at: datetime
