"""service/serving.py: every connection the API serves has Nagle's algorithm off, however
uvicorn bound its socket, and every documented way of serving it uses that protocol."""

from __future__ import annotations

import gc
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.serving import HTTP_PROTOCOL, NoDelayH11Protocol
from tests.helpers import client
from tests.pg import free_port

ROOT = Path(__file__).resolve().parents[1]


async def tiny_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"ok":true}'})


def no_delay_seen(protocol: type[H11Protocol]) -> list[int]:
    """Serve two requests on one kept-alive connection from a real uvicorn server whose
    socket is bound as ``uvicorn --workers N`` binds it, with ``protocol``; the value of
    TCP_NODELAY on each connection once the protocol has it."""
    seen: list[int] = []

    class Probe(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    config = uvicorn.Config(tiny_app, host="127.0.0.1", port=free_port(), http=Probe,
                            lifespan="off", log_level="warning")
    sock = config.bind_socket()
    assert sock.proto == 0  # what asyncio does not turn Nagle off on
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
            time.sleep(0.01)
        with httpx.Client(base_url=f"http://127.0.0.1:{config.port}", timeout=30) as c:
            assert [c.get("/").json() for _ in range(2)] == [{"ok": True}] * 2
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()
    return seen


def test_each_connection_has_nagle_off_on_a_socket_bound_as_workers_bind_it() -> None:
    assert no_delay_seen(NoDelayH11Protocol) == [1]


def test_uvicorns_own_protocol_leaves_it_on_there() -> None:
    """Why the class exists: on uvicorn's --workers socket its own h11 protocol keeps
    Nagle on (so small responses wait for the client's delayed ACK)."""
    assert no_delay_seen(H11Protocol) == [0]


def test_every_documented_way_to_serve_the_api_uses_the_protocol() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    commands = [compose["services"]["api"]["command"]]
    for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "api.yaml").read_text()):
        if doc and doc["kind"] == "Deployment":
            commands += [c["command"] for c in doc["spec"]["template"]["spec"]["containers"]]
    dockerfile = (ROOT / "Dockerfile").read_text()
    api_stage = dockerfile[dockerfile.index("FROM base AS api"):dockerfile.index(
        "FROM base AS worker")]
    commands.append(yaml.safe_load(api_stage[api_stage.index("CMD ") + 4:].replace(
        "\\\n", " ")))
    assert len(commands) == 3
    for command in commands:
        assert command[:2] == ["uvicorn", "service.app:create_app"], command
        assert command[command.index("--http") + 1] == HTTP_PROTOCOL, command
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"--http {HTTP_PROTOCOL}" in readme


def test_what_lives_as_long_as_the_app_is_kept_out_of_the_collectors_walks(
        db_url: str) -> None:
    """A full collection walked every object the process holds and held its requests up
    while it did (31-114 ms in the API's processes under load): the app freezes what is
    alive once it has started, and unfreezes it when it stops (so a test process collects
    it again)."""
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    with client(db_url) as c:
        assert c.get("/healthz").status_code == 200
        frozen = gc.get_freeze_count()
    assert frozen > 10_000  # the modules, the app, its routes and models
    assert gc.get_freeze_count() == 0
