"""A throwaway Postgres server for the test session (real server, never mocked).

Started with the machine's ``initdb``/``pg_ctl`` as a non-root user (``postgres`` when the
tests run as root), on a free loopback port, with durability switched off for speed. Set
``SSAD_TEST_POSTGRES_URL`` (a superuser URL without database) to use an existing server.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg


def _pg_bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"{name} not found: install PostgreSQL (apt-get install postgresql)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self) -> None:
        self.external = os.environ.get("SSAD_TEST_POSTGRES_URL")
        self.dir = Path(tempfile.mkdtemp(prefix="ssad-pg-"))
        self.port = free_port()
        self.user = "ssad"
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres")
        os.chmod(self.dir, 0o755)

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def start(self) -> PostgresServer:
        if self.external:
            return self
        subprocess.run([*self._as, _pg_bin("initdb"), "-D", str(self.data), "-A", "trust",
                        "-U", self.user, "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True)
        self.resume()
        return self

    def _pg_ctl(self, *args: str) -> None:
        subprocess.run([*self._as, _pg_bin("pg_ctl"), "-D", str(self.data), *args],
                       check=True, capture_output=True, timeout=90)

    def pause(self) -> None:
        """Stop the server (fast shutdown: clients are disconnected), keeping its data."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def resume(self) -> None:
        """Start the (initialised) server on its port, and wait until it accepts clients."""
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        self._pg_ctl("-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        if not self.external:
            subprocess.run([*self._as, _pg_bin("pg_ctl"), "-D", str(self.data), "-m",
                            "immediate", "stop"], capture_output=True, timeout=90)
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str, driver: str = "postgresql+psycopg") -> str:
        if self.external:
            return f"{self.external.rstrip('/')}/{database}".replace(
                "postgresql://", f"{driver}://", 1)
        return f"{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.url("postgres", "postgresql"), autocommit=True)

    def create_database(self, template: str | None = None) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"'
                         + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.admin():
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


@contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server, ready for clients, stopped (and its files removed) afterwards."""
    server = PostgresServer().start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
