"""A UDP socket read in batches and written with as few system calls as possible.

Reading: every datagram waiting in the socket (up to a bound per turn) is
handed over, then ``on_batch_end`` runs once, so connections flush once per
batch instead of once per datagram.

Writing: consecutive datagrams to the same address are sent as one
``sendmsg`` with UDP generic segmentation offload (``UDP_SEGMENT``): the
kernel cuts the buffer into datagrams of the segment size. Where the kernel
or the path refuses GSO, datagrams go one ``sendto`` each. A full send buffer
drops the datagram: QUIC recovers it like any other loss.

Source address: a socket bound to every address (``::`` / ``0.0.0.0``) asks the
kernel for each datagram's destination address (``IPV6_PKTINFO`` / ``IP_PKTINFO``)
and sends the answers from that same address. Without it, a multi-homed host
(a DaemonSet pod on the node's network) answers from whichever address the
route picks, and the client drops those packets.
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
_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
_IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_ANCILLARY = 256

Source = tuple[int, int, bytes] | None
"The ancillary item that makes a datagram leave from the address it came to."


def _source_of(ancillary: list[tuple[int, int, bytes]]) -> Source:
    """The destination address a datagram came to, as the item to send answers with."""
    for level, kind, data in ancillary:
        if level == socket.IPPROTO_IPV6 and kind == _IPV6_PKTINFO and len(data) >= 16:
            return (level, kind, data[:16] + b"\0\0\0\0")  # in6_pktinfo, any interface
        if level == socket.IPPROTO_IP and kind == _IP_PKTINFO and len(data) >= 12:
            return (level, kind, b"\0\0\0\0" + data[8:12] + b"\0\0\0\0")  # spec_dst
    return None


class DatagramSocket:
    """A non-blocking UDP socket driven by the event loop's reader callback."""

    def __init__(
        self,
        sock: socket.socket,
        on_datagram: Callable[[bytes, Any, Source], None],
        on_batch_end: Callable[[], None],
        gso: bool = True,
    ) -> None:
        self.sock = sock
        self._on_datagram = on_datagram
        self._on_batch_end = on_batch_end
        self.gso = gso and hasattr(socket.socket, "sendmsg")
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self.pktinfo = self._ask_destination()
        "True when answers are sent from the address each datagram came to."
        self._loop.add_reader(sock.fileno(), self._readable)

    def _ask_destination(self) -> bool:
        if self.sock.getsockname()[0] not in ("::", "0.0.0.0"):
            return False  # bound to one address: answers leave from it anyway
        try:
            if self.sock.family == socket.AF_INET6:  # IPv4 too, as mapped addresses
                self.sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVPKTINFO, 1)
            else:
                self.sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        except OSError:
            return False
        return True

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
        pktinfo = self.pktinfo
        for _ in range(_READ_BATCH):
            try:
                if pktinfo:
                    data, ancillary, _flags, addr = self.sock.recvmsg(_MAX_DATAGRAM, _ANCILLARY)
                    source = _source_of(ancillary)
                else:
                    data, addr = self.sock.recvfrom(_MAX_DATAGRAM)
                    source = None
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. ICMP errors reported on the socket
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                log.warning("UDP receive failed: %s", exc.strerror)
                break
            self._on_datagram(data, addr, source)
        self._on_batch_end()

    # ------------------------------------------------------------------ output

    def send(self, datagrams: Iterable[tuple[bytes, Any]], source: Source = None) -> None:
        """Send datagrams in order, batching runs to one address through GSO, from the
        address ``source`` names (the one the peer wrote to) when given."""
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
                self._send_run(run, run_addr, source)
                run = []
            run.append(data)
            run_addr = addr
        if run:
            self._send_run(run, run_addr, source)

    def _send_run(self, run: list[bytes], addr: Any, source: Source) -> None:
        extra = [source] if source is not None else []
        if len(run) > 1 and self.gso:
            segment = struct.pack("=H", len(run[0]))
            ancillary = [(_SOL_UDP, _UDP_SEGMENT, segment), *extra]
            try:
                self.sock.sendmsg([b"".join(run)], ancillary, 0, addr)
                return
            except (BlockingIOError, InterruptedError):
                return  # send buffer full: dropped, QUIC resends it
            except OSError as exc:
                log.info("UDP GSO unavailable (%s): sending datagrams one by one", exc.strerror)
                self.gso = False
        for data in run:
            try:
                if extra:
                    self.sock.sendmsg([data], extra, 0, addr)
                else:
                    self.sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                pass  # send buffer full: dropped, QUIC resends it
            except OSError:
                pass  # unreachable peer, address family mismatch: nothing to do
