"""The worker's and the gateway's listening sockets hand asyncio connections with TCP_NODELAY.

Both commands bind their own listeners (the worker for its metrics port, the gateway for its
metrics port) and give them to uvicorn. asyncio sets TCP_NODELAY on an accepted connection only
when its socket's protocol is IPPROTO_TCP; a socket made with protocol 0 kept Nagle's algorithm
on, and every response written in parts waited for the client's delayed ACK (~40 ms).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import pytest

from llmos_gateway.cli import bind as gateway_bind
from llmos_worker.server.main import bind as worker_bind


@pytest.mark.parametrize("bind", [worker_bind, gateway_bind], ids=["worker", "gateway"])
async def test_accepted_connections_have_nodelay(bind: Callable[[str, int], socket.socket]) -> None:
    listener = bind("127.0.0.1", 0)
    assert listener.proto == socket.IPPROTO_TCP
    seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        writer.close()

    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(seen, 5) != 0
        writer.close()
