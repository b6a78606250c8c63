"""What the database costs one API request (docs/benchmarks.md §8): the API's own session
pattern for a cached body (open a session, read three columns of one job by primary key,
commit, close) on Postgres, with and without the pool's pre-ping, against the same SELECT
alone on a held connection. Sequential, medians of 2,000.

    python -m bench.db_cost      # about 30 s
"""

from __future__ import annotations

import statistics
import time

from sqlalchemy import Engine, select

from service.migrate import upgrade_head
from ssad_common.db import end_transaction, make_engine, session_factory
from ssad_common.models import Job
from tests.pg import running_postgres


def run(engine: Engine, n: int = 2000) -> float:
    """Median ms of the API's session pattern for one cached body."""
    factory = session_factory(engine)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        session = factory()
        session.execute(select(Job.tenant_id, Job.status, Job.best_trial_number)
                        .where(Job.id == "x")).one_or_none()
        end_transaction(session, True)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    with running_postgres() as server:
        measure(server.url(server.create_database()))


def measure(url: str) -> None:
    upgrade_head(url)
    for ping in (True, False):
        engine = make_engine(url, pool_pre_ping=ping)
        run(engine, 200)  # warm the pool
        print(f"pre_ping={ping}: session + select + commit, median {run(engine):.3f} ms")
        engine.dispose()
    engine = make_engine(url)
    with engine.connect() as conn:
        times = []
        for _ in range(2000):
            start = time.perf_counter()
            conn.execute(select(Job.tenant_id).where(Job.id == "x")).one_or_none()
            times.append(time.perf_counter() - start)
    engine.dispose()
    print(f"the select alone on a held connection, median "
          f"{statistics.median(times) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
