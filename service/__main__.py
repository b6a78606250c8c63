"""``python -m service`` (= ``ssad-tune serve``): the API, plus (by default) one embedded
worker process.

With no SSAD_DATABASE_URL this is the zero-setup embedded mode: a SQLite file in the
working directory, migrated on start, one worker, and no authentication unless SSAD_AUTH
says otherwise (single user on one machine; said at start-up). With a Postgres URL, run
``alembic upgrade head`` first, start workers with ``python -m worker``, and
authentication is required (SSAD_AUTH=required, the default everywhere but here: see
``ApiSettings.for_embedded_mode``). This process builds the app itself and hands it to
uvicorn, so the app serves with exactly the settings printed at start-up.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import signal
import subprocess
import sys

import uvicorn

from service import migrate
from service.app import create_app
from service.serving import NoDelayH11Protocol
from service.settings import ApiSettings
from ssad_common import logs


def _stop_with_parent() -> None:
    """In the embedded worker's process, before exec: get SIGTERM if the API process dies
    (even by SIGKILL), so no worker outlives its server. Linux only; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _exit_cleanly(signum: int, _: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m service", description=(__doc__ or "").replace("``", ""),
        epilog="Settings are SSAD_* environment variables (README, Configuration)",
        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    settings = ApiSettings().for_embedded_mode()
    logs.configure(settings.log_format)
    log = logging.getLogger("ssad")
    if settings.embedded:
        migrate.upgrade_head(settings.database_url)  # embedded mode owns its SQLite file
    worker = None
    if settings.embedded_worker:
        # The worker reads its own settings (SSAD_WORKER_DEVICE...) from this environment.
        worker = subprocess.Popen([sys.executable, "-m", "worker"],
                                  preexec_fn=_stop_with_parent)
        log.info("embedded worker started (pid %d)", worker.pid)
    # uvicorn re-raises the SIGTERM/SIGINT it handled once it has shut down; make that an
    # exit through ``finally`` below, which stops the worker, not a death that orphans it.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    url = f"http://{settings.host}:{settings.port}"
    if settings.auth == "off":
        auth = ("authentication OFF: single-user mode, anyone who can reach this port can "
                "use it (set SSAD_AUTH=required to require API keys)")
    else:
        auth = ("authentication required: send `Authorization: Bearer <key>`; create keys "
                "with `ssad-tune keys create --tenant NAME`")
    print(f"ssad-tune API on {url} — docs: {url}/docs — {auth}", flush=True)
    try:
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                    log_level="info", http=NoDelayH11Protocol)
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
