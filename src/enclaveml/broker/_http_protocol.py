"""uvicorn's httptools protocol, with each response leaving in one write: one TLS record, one syscall.

uvicorn writes a response's head when the app sends ``http.response.start`` and its body on
``http.response.body``: two ``transport.write`` calls, so two TLS records and two ``write``
syscalls per answer. On loopback and in VMs a TCP write is expensive (the kernel runs the
receiver's side of the stack in the writer's syscall, and wakes it up), and the event loop
holds the GIL throughout: profiles of the key broker put a quarter of its CPU per release in
those writes (docs/performance.md, "Key broker"). The client also needs two reads.

:class:`CoalescingHttpToolsProtocol` hands uvicorn a transport that keeps the writes made
during one event-loop step and writes them together at the end of the step
(``loop.call_soon``), or at once when the connection closes or aborts. Nothing else
changes: flow control, reads and everything else go to the real transport. Written here
because neither uvicorn nor uvloop offers write coalescing (``TCP_CORK`` would need a
syscall to set and one to clear per response).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["CoalescingHttpToolsProtocol", "CoalescingTransport"]


class CoalescingTransport:
    """A transport whose writes within one loop step go out as one ``write`` (module docstring)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Write what is pending now (one call to the real transport)."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(chunk) for chunk in self._pending)

    def __getattr__(self, name: str) -> Any:  # everything else: the real transport
        return getattr(self._transport, name)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` over a :class:`CoalescingTransport`; give it to ``uvicorn.Config(http=...)``."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        coalescing: Any = CoalescingTransport(transport, asyncio.get_running_loop())
        super().connection_made(coalescing)
