"""A job's trial slots and stored trials as SQL counts, for any query over jobs: the
worker's claims (which job can take another slot) and the API's metrics (how many workers
the jobs could use) read the same numbers. Torch-free."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ScalarSelect, func, select

from ssad_common.models import JobSlot, JobTrial


def slot_count(job_id: Any) -> ScalarSelect[int]:
    """The live slots of ``job_id`` (a value, or a column such as ``Job.id``)."""
    return (select(func.count()).select_from(JobSlot)
            .where(JobSlot.job_id == job_id).scalar_subquery())


def stored_trial_count(job_id: Any) -> ScalarSelect[int]:
    """The trials stored for ``job_id`` (a value, or a column such as ``Job.id``)."""
    return (select(func.count()).select_from(JobTrial)
            .where(JobTrial.job_id == job_id).scalar_subquery())
