"""A UDP socket read in batches and written with as few system calls as possible.

Reading: every datagram waiting in the socket (up to a bound per turn) is
handed over, then ``on_batch_end`` runs once, so connections flush once per
batch instead of once per datagram.

Writing: consecutive datagrams to the same address are sent as one
``sendmsg`` with UDP generic segmentation offload (``UDP_SEGMENT``): the
kernel cuts the buffer into datagrams of the segment size. Where the kernel
or the path refuses GSO, datagrams go one ``sendto`` each. A full send buffer
drops the datagram: QUIC recovers it like any other loss.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["DatagramSocket"]

log = logging.getLogger("quicproxy")

_SOL_UDP = getattr(socket, "SOL_UDP", 17)
_UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
_MAX_SEGMENTS = 64
_MAX_GSO_BYTES = 65000
_READ_BATCH = 64
_MAX_DATAGRAM = 65535


class DatagramSocket:
    """A non-blocking UDP socket driven by the event loop's reader callback."""

    def __init__(
        self,
        sock: socket.socket,
        on_datagram: Callable[[bytes, Any], None],
        on_batch_end: Callable[[], None],
        gso: bool = True,
    ) -> None:
        self.sock = sock
        self._on_datagram = on_datagram
        self._on_batch_end = on_batch_end
        self.gso = gso and hasattr(socket.socket, "sendmsg")
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self.sent_calls = 0
        "System calls used to send (for tests and benchmarks)."
        self.sent_datagrams = 0
        self.dropped = 0
        "Datagrams dropped because the send buffer was full."
        self._loop.add_reader(sock.fileno(), self._readable)

    @property
    def address(self) -> Any:
        return self.sock.getsockname()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()

    # ------------------------------------------------------------------ input

    def _readable(self) -> None:
        recv = self.sock.recvfrom
        for _ in range(_READ_BATCH):
            try:
                data, addr = recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP errors reported on the socket
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                log.warning("UDP receive failed: %s", exc.strerror)
                break
            self._on_datagram(data, addr)
        self._on_batch_end()

    # ------------------------------------------------------------------ output

    def send(self, datagrams: Iterable[tuple[bytes, Any]]) -> None:
        """Send datagrams in order, batching runs to one address through GSO."""
        if self._closed:
            return
        run: list[bytes] = []
        run_addr: Any = None
        for data, addr in datagrams:
            if run and (
                addr != run_addr
                or len(data) > len(run[0])
                or len(run[-1]) < len(run[0])
                or len(run) >= _MAX_SEGMENTS
                or (len(run) + 1) * len(run[0]) > _MAX_GSO_BYTES
            ):
                self._send_run(run, run_addr)
                run = []
            run.append(data)
            run_addr = addr
        if run:
            self._send_run(run, run_addr)

    def _send_run(self, run: list[bytes], addr: Any) -> None:
        self.sent_datagrams += len(run)
        if len(run) > 1 and self.gso:
            segment = struct.pack("=H", len(run[0]))
            try:
                self.sock.sendmsg([b"".join(run)], [(_SOL_UDP, _UDP_SEGMENT, segment)], 0, addr)
                self.sent_calls += 1
                return
            except (BlockingIOError, InterruptedError):
                self.dropped += len(run)
                return
            except OSError as exc:
                log.info("UDP GSO unavailable (%s): sending datagrams one by one", exc.strerror)
                self.gso = False
        for data in run:
            try:
                self.sock.sendto(data, addr)
                self.sent_calls += 1
            except (BlockingIOError, InterruptedError):
                self.dropped += 1
            except OSError:
                pass  # unreachable peer, address family mismatch: nothing to do
