"""The broker's uvicorn protocol writes each response once: what one loop step writes leaves together.

Real sockets on 127.0.0.1 and real event loops (asyncio's and uvloop, which the broker
runs on): the peer sees nothing while the step that wrote is still running, then all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import pytest
import uvloop

from enclaveml.broker._http_protocol import CoalescingTransport

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _read(peer: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = peer.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


class _Watcher(asyncio.Protocol):
    """Knows when its transport is really closed."""

    def __init__(self) -> None:
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


async def _connected() -> tuple[asyncio.Transport, socket.socket, _Watcher]:
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        transport, watcher = await asyncio.get_running_loop().create_connection(
            _Watcher, "127.0.0.1", listener.getsockname()[1]
        )
        peer, _address = listener.accept()
    peer.settimeout(10)
    return transport, peer, watcher


def _run(loop_factory: Callable[[], asyncio.AbstractEventLoop], story: Callable[[], object]) -> None:
    loop = loop_factory()
    try:
        loop.run_until_complete(story())  # type: ignore[arg-type]
    finally:
        loop.close()


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_a_response_head_and_body_leave_together_after_the_step(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def story() -> None:
        transport, peer, _watcher = await _connected()
        with peer:
            coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
            coalescing.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
            coalescing.write(b"{}")
            peer.setblocking(False)
            with pytest.raises(BlockingIOError):
                peer.recv(1024)  # nothing on the wire while the step runs
            assert coalescing.get_write_buffer_size() == 40
            await asyncio.sleep(0)  # the step ends: one write of both
            peer.settimeout(10)
            assert _read(peer, 40) == b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
            assert coalescing.get_write_buffer_size() == 0
            coalescing.close()

    _run(loop_factory, story)


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_closing_sends_what_is_pending_and_aborting_drops_it(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def story() -> None:
        transport, peer, watcher = await _connected()
        with peer:
            coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
            coalescing.write(b"last words")
            coalescing.close()  # "connection: close" answers: written, then closed
            await watcher.lost
            assert _read(peer, 64) == b"last words"  # then the end of the stream
        transport, peer, watcher = await _connected()
        with peer:
            coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
            coalescing.write(b"never sent")
            coalescing.abort()
            await watcher.lost
            with contextlib.suppress(ConnectionResetError):  # an abort may reset rather than close
                assert _read(peer, 64) == b""

    _run(loop_factory, story)


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_everything_else_is_the_real_transport(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def story() -> None:
        transport, peer, _watcher = await _connected()
        with peer:
            coalescing = CoalescingTransport(transport, asyncio.get_running_loop())
            assert coalescing.get_extra_info("peername") == transport.get_extra_info("peername")
            assert not coalescing.is_closing()
            coalescing.writelines([b"a", b"b", b"c"])
            await asyncio.sleep(0)
            assert _read(peer, 3) == b"abc"
            coalescing.close()
            assert coalescing.is_closing()

    _run(loop_factory, story)
