"""``python -m service``: the API, plus (by default) one embedded worker process.

With no SSAD_DATABASE_URL this is the zero-setup embedded mode: a SQLite file in the
working directory, migrated on start, and one worker. With a Postgres URL, run
``alembic upgrade head`` first and start workers with ``python -m worker``.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import uvicorn

from service import migrate
from service.settings import Settings


def main() -> int:
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log = logging.getLogger("ssad")
    if settings.database_url.startswith("sqlite"):
        migrate.upgrade_head(settings.database_url)  # embedded mode owns its SQLite file
    worker = None
    if settings.embedded_worker:
        worker = subprocess.Popen([sys.executable, "-m", "worker",
                                   "--device", settings.worker_device])
        log.info("embedded worker started (pid %d)", worker.pid)
    url = f"http://{settings.host}:{settings.port}"
    print(f"ssad-tune API on {url} — docs: {url}/docs (no authentication: single-user mode)",
          flush=True)
    try:
        uvicorn.run("service.app:create_app", factory=True, host=settings.host,
                    port=settings.port, log_level="info")
    finally:
        if worker is not None:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
