"""The bare FastAPI endpoint bench/api_load.py compares the API with: the same paths, the
same response bodies (read once from the files BENCH_BARE_JOB and BENCH_BARE_SCORES), no
database, no authentication, no middleware. Served like the API:

    uvicorn bench.bare_app:create_app --factory --workers 2
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI, Response


def create_app() -> FastAPI:
    job = Path(os.environ["BENCH_BARE_JOB"]).read_bytes()
    scores = Path(os.environ["BENCH_BARE_SCORES"]).read_bytes()
    app = FastAPI()

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: str) -> Response:
        return Response(job, media_type="application/json")

    @app.get("/v1/jobs/{job_id}/scores")
    def get_scores(job_id: str) -> Response:
        return Response(scores, media_type="application/json")

    return app
