"""How the API is served: uvicorn's HTTP/1.1 protocol with ``TCP_NODELAY`` on every
connection, however the listening socket was made.

uvicorn with ``--workers N`` binds the socket itself with ``socket.socket(family)``, whose
protocol number is 0, and asyncio turns Nagle's algorithm off only on sockets whose
protocol is ``IPPROTO_TCP`` (``asyncio.base_events._set_nodelay``). So every connection of
a multi-process API kept Nagle on, and uvicorn writes a response's head and body in two
sends: on a kept-alive connection the body then waits for the client's delayed ACK of the
head, about 40 ms on Linux, for every small response (a job's JSON, an error). Measured:
the second request on one connection took 42 ms against 1–3 ms for the first, and
``GET /v1/jobs/{id}`` under wrk was capped at one request per 44 ms per connection, API
and bare endpoint alike (docs/benchmarks.md §8). A single-process ``uvicorn --host …``
binds through ``loop.create_server``, whose sockets carry ``IPPROTO_TCP``, and was not
affected; setting the option here makes both the same.

Serve with ``uvicorn service.app:create_app --factory --http
service.serving:NoDelayH11Protocol`` (the Dockerfile, the compose file and the Kubernetes
manifests do); ``python -m service`` uses it already.
"""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with ``TCP_NODELAY`` set on each TCP connection it serves."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)


#: The ``--http`` value that names :class:`NoDelayH11Protocol` on uvicorn's command line.
HTTP_PROTOCOL = f"{__name__}:{NoDelayH11Protocol.__qualname__}"
