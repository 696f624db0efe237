"""The QUIC listener: datagrams to connections, caps, address validation on demand.

- Dispatch is one dictionary look-up by destination connection ID; a
  connection keeps the set of its own IDs, so tearing it down is O(its IDs).
- A datagram that cannot start a valid handshake creates no state: it must be
  an Initial of at least 1200 bytes that decrypts with the keys its DCID
  implies (forged or rewritten Initials fail here).
- Caps: connections in total and per client address, handshakes in progress
  in total and per address, bytes a connection may send before its handshake
  completes, and a deadline for the handshake.
- Above ``quic.retry_above`` handshakes in progress (or always, with
  ``quic.retry``) a new Initial without a valid token gets a stateless Retry:
  spoofed sources never come back with the token.
- Output is flushed once per event-loop turn for every connection that has
  something to send, through :class:`DatagramSocket` (GSO batching).
- New connections wait their turn: a datagram for a known connection is
  handled as it is read, an Initial that would start a handshake (the
  costly part: key exchange, signature) goes to a bounded queue, and so do
  the datagrams that follow it before it is admitted (0-RTT, the rest of a
  ClientHello). 16 handshakes are started per event-loop turn, each with the
  datagrams queued behind it (a post-quantum ClientHello takes two; 64
  datagrams per turn at most), each server flight leaving at once. A burst
  or a flood of Initials delays established connections and handshakes in
  progress by one turn's admissions at most, and the burst's connections
  come up a few at a time instead of all at its end.
- Before the socket is bound, one HTTP/3 request runs over an in-memory
  handshake on the listener's configuration (``_h3.warm_up``), so the first
  client of a fresh worker does not wait for first use of the QUIC and TLS code.
- With several workers on one port (SO_REUSEPORT hashes the 4-tuple), every
  connection ID carries its worker's index; a datagram for another worker's
  connection (the client's address changed) is handed to that worker over a
  Unix datagram socket, with the client's address in front.
- Retry tokens and session tickets are sealed, and stateless-reset tokens derived,
  under keys of the QUIC secret (``_keys``; ``quic.shared_secret_file`` is looked
  at every two seconds and read again when it changed): replicas with the same file
  accept each other's tokens and tickets.
- A short-header datagram for a connection nobody here knows (this process
  restarted, or a balancer moved the client) gets a stateless reset (RFC 9000
  §10.3) with the token derived from the connection ID and the QUIC secret
  (``_keys``): the one the connection was given, when the secret is shared.
  Never for a long header, never one that is not smaller than the datagram (no
  loops) or under 21 bytes; at most ``quic.stateless_reset_rate`` a second, and a
  tenth of that per client address (``ResetBudget``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import random
import re
import socket
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._caps import AddressCounter, address_key
from .._certwatch import Certificates
from .._config import Config
from .._handler import Handler
from .._metrics import metrics
from .._sockets import bind_socket, plain_addr
from ._conn import QuicConn
from ._core import (
    MIN_INITIAL_SIZE,
    MIN_RESET_SIZE,
    CreditedConnection,
    Header,
    RetryTokens,
    SessionTickets,
    generation,
    initial_decrypts,
    owner,
    parse_header,
    server_configuration,
    stateless_reset,
    version_negotiation,
)
from ._h3 import H3Conn, warm_up
from ._keys import QuicKeys
from ._udp import DatagramSocket, Source

__all__ = ["QuicListener", "Workers", "handover_folder", "new_generation", "start_quic_listener"]

log = logging.getLogger("quicproxy")

_WAITING_INITIALS = 256
"Initials queued for admission at most; beyond, they are dropped (clients resend)."
_WAITING_BYTES = 1 << 20
"Bytes of queued Initials at most."
_ADMIT_PER_TURN = 16
"Handshakes started per event-loop turn (the costly part: key exchange, signature)."
_ADMIT_DATAGRAMS = 64
"Queued datagrams handled per event-loop turn at most (the rest of a ClientHello, 0-RTT)."
_KEYS_EVERY = 2.0
"Seconds between looks at quic.shared_secret_file (a changed file is read again)."


class ResetBudget:
    """Token buckets for stateless resets: ``rate`` a second in all (burst: one second's),
    a tenth of it per client address (at least one; burst: two seconds'). The table of
    addresses is an LRU of ``max_entries``: spoofed sources evict each other."""

    def __init__(self, rate: int, max_entries: int = 4096) -> None:
        self.rate = float(rate)
        self.per_source = max(1.0, self.rate / 10)
        self.max_entries = max_entries
        self._all = [self.rate, 0.0]
        self._sources: OrderedDict[str, list[float]] = OrderedDict()

    def _take(self, bucket: list[float], rate: float, burst: float, now: float) -> bool:
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True

    def allow(self, host: str, now: float) -> bool:
        if self.rate <= 0:
            return False
        key = address_key(host)
        bucket = self._sources.get(key)
        if bucket is None:
            bucket = [2 * self.per_source, now]
            self._sources[key] = bucket
            if len(self._sources) > self.max_entries:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(key)
        if not self._take(bucket, self.per_source, 2 * self.per_source, now):
            return False
        return self._take(self._all, self.rate, self.rate, now)


@dataclass
class Workers:
    """This worker's place among the workers sharing the port, and the run it belongs to."""

    index: int
    count: int
    folder: str
    "Where each worker's Unix socket for handed-over datagrams lives (one folder per port)."
    secret: bytes = b""
    "The QUIC secret the supervisor made for its workers (without a shared secret file)."
    generation: int | None = None
    """This run's generation (a byte in every connection ID): processes started on the
    same port while this one runs have another, and hand each other their datagrams."""

    def path(self, index: int, generation: int | None = -1) -> str:
        """The socket of worker ``index`` of ``generation`` (this run's by default)."""
        if generation == -1:
            generation = self.generation
        if generation is None:
            return os.path.join(self.folder, f"w{index}.sock")
        return os.path.join(self.folder, f"g{generation}w{index}.sock")


_HANDOVER_NAME = re.compile(r"g(\d{1,3})w(\d{1,3})\.sock")
_LOOK_EVERY = 1.0
"Seconds between looks at the hand-over folder (which runs share the port)."


def handover_folder(cfg: Config, port: int) -> str:
    """The folder of the hand-over sockets for ``port``: ``quic.handover_dir``, else
    $XDG_RUNTIME_DIR/quicproxy, /run/quicproxy or the temporary folder's quicproxy-UID;
    one folder per port number, made (mode 0700) when missing."""
    base = cfg.quic.handover_dir
    if not base:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and os.path.isdir(runtime):
            base = os.path.join(runtime, "quicproxy")
        elif os.access("/run", os.W_OK):
            base = "/run/quicproxy"
        else:
            base = os.path.join(tempfile.gettempdir(), f"quicproxy-{os.getuid()}")
    folder = os.path.join(base, str(port))
    os.makedirs(folder, mode=0o700, exist_ok=True)
    for path in (base, folder):  # whoever can write there can inject datagrams
        info = os.stat(path)
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise OSError(errno.EPERM, f"{path} is not this user's alone")
    return folder


def new_generation(folder: str) -> int:
    """A generation no socket in ``folder`` names (a random one when all 256 are taken)."""
    taken = set()
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            found = _HANDOVER_NAME.fullmatch(name)
            if found:
                taken.add(int(found.group(1)))
    free = [g for g in range(256) if g not in taken]
    return random.choice(free) if free else random.randrange(256)


def _pack(addr: Any, source: Source, data: bytes) -> bytes:
    """A handed-over datagram: the client's address and where it wrote to, then the bytes."""
    where = f"{source[0]}|{source[1]}|{source[2].hex()}" if source else ""
    return f"{'|'.join(map(str, addr))}\n{where}\n".encode() + data


def _unpack(message: bytes) -> tuple[Any, Source, bytes]:
    head, where, data = message.split(b"\n", 2)
    host, *rest = head.decode().split("|")
    source: Source = None
    if where:
        level, kind, raw = where.decode().split("|")
        source = (int(level), int(kind), bytes.fromhex(raw))
    return (host, *map(int, rest)), source, data


class QuicListener:
    """The UDP side of the https port."""

    def __init__(
        self,
        cfg: Config,
        handler: Handler,
        cert: str,
        key: str,
        workers: Workers | None = None,
        keys: QuicKeys | None = None,
    ) -> None:
        q = cfg.quic
        self.cfg = q
        self.handler = handler
        self.loop = asyncio.get_running_loop()
        self.configuration = server_configuration(
            cert=cert,
            key=key,
            idle_timeout=q.idle_timeout,
            max_datagram_size=q.max_datagram_size,
            stream_window=q.stream_window,
            probe_size=q.probe_datagram_size,
        )
        self._cid_length = self.configuration.connection_id_length
        self._versions = list(self.configuration.supported_versions)
        self.workers = workers
        self.worker = workers.index if workers is not None else None
        self.keys = keys or quic_keys(cfg, workers)
        "The QUIC secret's keys (see ``_keys``): reset tokens, Retry tokens, tickets."
        self.generation = workers.generation if workers is not None else None
        self.retry = RetryTokens(self.worker, self.keys, self.generation)
        self.tickets = SessionTickets(self.keys) if q.early_data else None
        self.resets = ResetBudget(q.stateless_reset_rate)
        self._handover: socket.socket | None = None
        self._others: list[tuple[int, int]] = []
        "(generation, worker) of the other runs' sockets on this port, newest first."
        self._looked = -_LOOK_EVERY
        self.by_cid: dict[bytes, QuicConn] = {}
        self.connections: set[QuicConn] = set()
        self.handshakes = 0
        self.per_address = AddressCounter(q.max_connections_per_address)
        "Connections per client address (handshaking or not)."
        self.handshakes_per_address = AddressCounter(q.max_handshakes_per_address)
        self.draining = False
        self.socket: DatagramSocket | None = None
        self.tls_store: Certificates | None = None
        self.on_closed: Callable[[], None] | None = None
        "Told of each connection forgotten (the server's heap trimmer counts them)."
        "Where new connections take the current certificate pairs from (set by the server)."
        self.address: tuple[str, int] = ("", 0)
        self._dirty: set[QuicConn] = set()
        self._flush: asyncio.Handle | None = None
        self.stats = dict.fromkeys(
            (
                "refused",
                "retry",
                "invalid",
                "handshakes",
                "expired",
                "shed",
                "handed_over",
                "handover_dropped",
                "reset",
                "reset_limited",
            ),
            0,
        )
        self._budget = float(q.max_new_per_second)
        self._budget_at = self.loop.time()
        self._waiting: deque[tuple[Header, bytes, Any, Source]] = deque()
        self._waiting_bytes = 0
        self._waiting_cids: dict[bytes, int] = {}
        "Destination IDs of the queued datagrams, and how many each."
        self._admit: asyncio.Handle | None = None
        self._keys_timer: asyncio.TimerHandle | None = None
        self.warmed = False
        "Whether an in-memory HTTP/3 exchange ran first (see ``_h3.warm_up``)."

    def bind(self, sock: Any) -> None:
        self.socket = DatagramSocket(
            sock, self.datagram_received, self._batch_end, gso=self.cfg.gso
        )
        self.address = plain_addr(self.socket.address)
        if self.keys.path:
            self._keys_timer = self.loop.call_later(_KEYS_EVERY, self._refresh_keys)
        if self.workers is not None:
            path = self.workers.path(self.workers.index)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self._handover = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._handover.bind(path)
            self._handover.setblocking(False)
            self.loop.add_reader(self._handover.fileno(), self._handed_over)

    def _refresh_keys(self) -> None:
        """Read the shared secret file again if it changed (a rotated secret)."""
        self.keys.refresh()
        self._keys_timer = self.loop.call_later(_KEYS_EVERY, self._refresh_keys)

    def _handed_over(self) -> None:
        """Datagrams another worker received for one of our connections."""
        assert self._handover is not None
        for _ in range(64):
            try:
                message = self._handover.recv(70000)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            try:
                addr, source, data = _unpack(message)
            except ValueError:
                continue
            self.datagram_received(data, addr, source, handed=True)
        self._batch_end()

    def _hand_over(self, header: Header, data: bytes, addr: Any, source: Source) -> bool:
        """Send a datagram to the worker, of this run or of another on the port, whose
        connection ID it carries; while draining, a new connection's datagrams go to the
        newest other run. False when it stays here (then nobody has its connection)."""
        workers = self.workers
        if workers is None or self._handover is None:
            return False
        first = header.long and header.initial and not header.token
        if len(header.dcid) == self._cid_length and not first:
            # not a new client's first Initial (its DCID is the client's: any worker takes it)
            target, gen = owner(header.dcid), generation(header.dcid)
            if self.generation is None or gen == self.generation:
                if target != workers.index and 0 <= target < workers.count:
                    return self._send_over(workers.path(target), addr, source, data)
            elif (gen, target) in self._other_runs():
                return self._send_over(workers.path(target, gen), addr, source, data)
        if self.draining and header.long:
            # a new connection while this run drains: the run that took over starts it
            for gen, target in self._other_runs():
                if target == workers.index:
                    return self._send_over(workers.path(target, gen), addr, source, data)
            for gen, target in self._other_runs():
                return self._send_over(workers.path(target, gen), addr, source, data)
        return False

    def _send_over(self, path: str, addr: Any, source: Source, data: bytes) -> bool:
        assert self._handover is not None
        try:
            self._handover.sendto(_pack(addr, source, data), path)
        except (BlockingIOError, InterruptedError):
            self.stats["handover_dropped"] += 1
            return True  # its queue is full: dropped, as on a busy link
        except OSError:
            return False  # gone (a run that ended without removing its socket)
        self.stats["handed_over"] += 1
        return True

    def _other_runs(self) -> list[tuple[int, int]]:
        """(generation, worker) of the other runs' sockets on this port (looked at once
        a second at most), newest first."""
        now = self.loop.time()
        if now - self._looked < _LOOK_EVERY or self.workers is None:
            return self._others
        self._looked = now
        found = []
        folder = self.workers.folder
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                match = _HANDOVER_NAME.fullmatch(name)
                if not match or int(match.group(1)) == self.generation:
                    continue
                with contextlib.suppress(OSError):
                    when = os.stat(os.path.join(folder, name)).st_mtime
                    found.append((when, int(match.group(1)), int(match.group(2))))
        self._others = [(gen, index) for _, gen, index in sorted(found, reverse=True)]
        return self._others

    # ------------------------------------------------------------------ input

    def datagram_received(
        self, data: bytes, addr: Any, source: Source = None, handed: bool = False
    ) -> None:
        header = parse_header(data, self._cid_length)
        if header is None:
            return
        conn = self.by_cid.get(header.dcid)
        if conn is not None:
            conn.source = source
            self._receive(conn, data, addr)
            return
        if header.long and header.dcid in self._waiting_cids:
            # more of a connection still waiting to be admitted (0-RTT, the rest of a
            # ClientHello): it follows its Initial in the queue
            self._wait_turn(header, data, addr, source)
            return
        if not handed and self._hand_over(header, data, addr, source):
            return
        if not header.long:
            self._stateless_reset(header, data, addr, source)
            return
        if header.negotiation:
            return  # a Version Negotiation: no answer
        if header.version not in self._versions:
            if len(data) >= MIN_INITIAL_SIZE:  # no amplification: answer big datagrams only
                self.send([(version_negotiation(header, self._versions), addr)], source)
            return
        if self._opens(header, data):
            self._wait_turn(header, data, addr, source)

    def _stateless_reset(self, header: Header, data: bytes, addr: Any, source: Source) -> None:
        """A short-header datagram of a connection nobody here knows: a stateless reset,
        when it is large enough to answer with a smaller one and the budget allows."""
        if len(data) <= MIN_RESET_SIZE:
            return  # no reset both smaller than it and large enough (RFC 9000 §10.3.3)
        if not self.resets.allow(plain_addr(addr)[0], self.loop.time()):
            self.stats["reset_limited"] += 1
            _safe(lambda: metrics.stateless_resets.labels(result="limited").inc())
            return  # a flood costs a bucket look-up a datagram, no HMAC
        reset = stateless_reset(header.dcid, len(data), self.keys)
        if reset is None:
            return
        self.stats["reset"] += 1
        _safe(lambda: metrics.stateless_resets.labels(result="sent").inc())
        self.send([(reset, addr)], source)

    def _opens(self, header: Header, data: bytes) -> bool:
        """Whether a datagram of an unknown connection may open one: a padded Initial
        (no amplification) while the listener takes new connections."""
        return header.initial and len(data) >= MIN_INITIAL_SIZE and not self.draining

    def _wait_turn(self, header: Header, data: bytes, addr: Any, source: Source) -> None:
        if (
            len(self._waiting) >= _WAITING_INITIALS
            or self._waiting_bytes + len(data) > _WAITING_BYTES
        ):
            self._drop("shed", "queue")
            return
        self._waiting.append((header, data, addr, source))
        self._waiting_bytes += len(data)
        self._waiting_cids[header.dcid] = self._waiting_cids.get(header.dcid, 0) + 1
        if self._admit is None:
            self._admit = self.loop.call_soon(self._admit_next)

    def _admit_next(self) -> None:
        """Queued Initials, a bounded number per event-loop turn; what each starts is
        sent at once, once the datagrams queued behind it (the rest of a ClientHello
        too large for one) are in: else the first answer is a lone ACK."""
        self._admit = None
        started = 0
        for _ in range(_ADMIT_DATAGRAMS):
            if not self._waiting:
                return
            header, data, addr, source = self._waiting[0]
            conn = self.by_cid.get(header.dcid)  # admitted since (a resent or split Initial)
            if conn is None:
                if started == _ADMIT_PER_TURN:
                    break  # the next handshake waits for the next turn
                started += 1
            self._waiting.popleft()
            self._waiting_bytes -= len(data)
            left = self._waiting_cids.pop(header.dcid) - 1
            if left:
                self._waiting_cids[header.dcid] = left
            if conn is not None:
                conn.source = source
                self._receive(conn, data, addr)
            elif self._opens(header, data):
                conn = self._new_connection(header, data, addr, source)
            if conn is not None and not left:  # a split ClientHello: one flight, no ACK first
                self.send_now(conn)
        if self._waiting:
            self._admit = self.loop.call_soon(self._admit_next)

    def _receive(self, conn: QuicConn, data: bytes, addr: Any) -> None:
        try:
            conn.receive(data, addr, self.loop.time())
        except Exception:
            log.exception("QUIC connection from %s failed", conn.client[0])
            conn.terminated()
            return
        if conn.handshaking and conn.received_bytes > self.cfg.max_handshake_bytes:
            self.stats["refused"] += 1
            log.info("QUIC handshake from %s sent too much: dropped", conn.client[0])
            conn.terminated()

    def _capped(self, host: str) -> str:
        """Which cap refuses a new connection from ``host``; "" when none does, and
        then the connection holds its address's handshake and connection slots."""
        q = self.cfg
        if len(self.connections) >= q.max_connections:
            return "connections"
        if self.handshakes >= q.max_handshakes:
            return "handshakes"
        if not self.handshakes_per_address.acquire(host):
            return "address_handshakes"
        if not self.per_address.acquire(host):
            self.handshakes_per_address.release(host)
            return "address_connections"
        return ""

    def _drop(self, stat: str, reason: str) -> None:
        self.stats[stat] += 1
        _safe(lambda: metrics.initials_dropped.labels(reason=reason).inc())

    def _refuse(self, why: str) -> None:
        self.stats["refused"] += 1
        _safe(lambda: metrics.connections_refused.labels(reason=f"quic_{why}").inc())

    def _examine_budget(self) -> bool:
        """Token bucket for Initials of unknown connections: checking one costs crypto,
        so a flood beyond the rate is dropped unread (real clients retransmit)."""
        now = self.loop.time()
        rate = self.cfg.max_new_per_second
        self._budget = min(float(rate), self._budget + (now - self._budget_at) * rate)
        self._budget_at = now
        if self._budget < 1:
            return False
        self._budget -= 1
        return True

    def _new_connection(
        self, header: Header, data: bytes, addr: Any, source: Source
    ) -> QuicConn | None:
        q = self.cfg
        if not self._examine_budget():
            self._drop("shed", "rate")
            return None
        if not initial_decrypts(data, header):
            self._drop("invalid", "invalid")
            return None
        original_dcid = None
        if header.token:
            original_dcid = self.retry.validate(header, addr, time.time())
        host = plain_addr(addr)[0]
        if original_dcid is None:
            if q.retry or self.handshakes >= q.retry_above:
                self.stats["retry"] += 1
                _safe(metrics.retry_sent.inc)
                retry = self.retry.retry_packet(header, addr, time.time())
                self.send([(retry, addr)], source)
                return None
        refused = self._capped(host)
        if refused:
            self._refuse(refused)
            return None
        configuration = self.configuration
        choose = None
        if self.tls_store is not None:  # the certificate pairs in use now (rotation)
            configuration = self.tls_store.quic_configuration(configuration)
            if self.tls_store.stores:  # several: chosen by the ClientHello's SNI
                choose = self.tls_store.quic_pair
        quic = CreditedConnection(
            worker=self.worker,
            keys=self.keys,
            certificates=choose,
            configuration=configuration,
            original_destination_connection_id=original_dcid or header.dcid,
            retry_source_connection_id=header.dcid if original_dcid else None,
            tickets=self.tickets,
            generation=self.generation,
        )
        conn = H3Conn(quic, self, self.handler, addr)
        quic.on_cid_issued = functools.partial(self.cid_issued, conn)
        conn.source = source
        self.connections.add(conn)
        _safe(lambda: metrics.active_connections.labels("h3").inc())
        self.handshakes += 1
        self.stats["handshakes"] += 1
        self.cid_issued(conn, header.dcid)
        self.cid_issued(conn, quic.host_cid)
        conn.deadline = self.loop.call_later(q.handshake_timeout, self._handshake_deadline, conn)
        self._receive(conn, data, addr)
        return conn

    def _handshake_deadline(self, conn: QuicConn) -> None:
        if conn.handshaking and not conn.closed:
            self.stats["expired"] += 1
            conn.terminated()

    # ------------------------------------------------------------------ connection callbacks

    def cid_issued(self, conn: QuicConn, cid: bytes) -> None:
        if not conn.closed:
            self.by_cid[cid] = conn
            conn.cids.add(cid)

    def cid_retired(self, conn: QuicConn, cid: bytes) -> None:
        if self.by_cid.get(cid) is conn:
            del self.by_cid[cid]
        conn.cids.discard(cid)

    def handshake_done(self, conn: QuicConn) -> None:
        _cancel_deadline(conn)
        if conn.handshaking:
            conn.handshaking = False
            self.handshakes -= 1
            self.handshakes_per_address.release(conn.client[0])
            _safe(metrics.quic_handshakes.inc)

    def remove(self, conn: QuicConn) -> None:
        """Forget a connection: O(number of its connection IDs). Nothing of the listener
        refers to it afterwards (its handshake deadline's handle held it for
        ``quic.handshake_timeout``)."""
        _cancel_deadline(conn)
        for cid in conn.cids:
            if self.by_cid.get(cid) is conn:
                del self.by_cid[cid]
        conn.cids.clear()
        if conn in self.connections:
            self.connections.discard(conn)
            _safe(lambda: metrics.active_connections.labels("h3").dec())
            if self.on_closed is not None:
                self.on_closed()
            self.per_address.release(conn.client[0])
            if conn.handshaking:
                conn.handshaking = False
                self.handshakes -= 1
                self.handshakes_per_address.release(conn.client[0])
        self._dirty.discard(conn)

    # ------------------------------------------------------------------ output

    def dirty(self, conn: QuicConn) -> None:
        self._dirty.add(conn)
        if self._flush is None:
            self._flush = self.loop.call_soon(self.flush)

    def _batch_end(self) -> None:
        """After a batch of datagrams: one flush, queued behind the request tasks the
        batch started, so each runs to its first wait (its upstream request leaves)
        before the batch's ACKs and stream credit are built and sent."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what every connection with news has to send, and re-arm its timer."""
        self._flush = None
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        now = self.loop.time()
        for conn in dirty:
            conn.output(now)

    def send_now(self, conn: QuicConn) -> None:
        """Send one connection's queued datagrams now (a new connection's flight, what
        is queued before a close) and re-arm its timer."""
        self._dirty.discard(conn)
        conn.output(self.loop.time())

    def send(self, datagrams: list[tuple[bytes, Any]], source: Source = None) -> None:
        if self.socket is not None:
            self.socket.send(datagrams, source)

    # ------------------------------------------------------------------ life cycle

    def drain(self) -> None:
        """Stop taking new connections; GOAWAY on every open one."""
        self.draining = True
        for conn in list(self.connections):
            conn.shutdown()

    async def wait_closed(self, seconds: float) -> None:
        """Wait (bounded) for connections to finish their graceful close."""
        deadline = self.loop.time() + seconds
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)

    def close(self) -> None:
        if self._keys_timer is not None:
            self._keys_timer.cancel()
            self._keys_timer = None
        if self._admit is not None:
            self._admit.cancel()
            self._admit = None
        self._waiting.clear()
        self._waiting_cids.clear()
        for conn in list(self.connections):
            conn.close()
        self.flush()
        for conn in list(self.connections):
            conn.terminated()
        if self.socket is not None:
            self.socket.close()
        if self._handover is not None:
            self.loop.remove_reader(self._handover.fileno())
            self._handover.close()
            self._handover = None
            if self.workers is not None:  # datagrams for this run now get a reset
                with contextlib.suppress(OSError):
                    os.unlink(self.workers.path(self.workers.index))


def quic_keys(cfg: Config, workers: Workers | None = None) -> QuicKeys:
    """The keys of ``quic.shared_secret_file``, else of the secret the workers'
    supervisor made, else of a secret of this process; said once at start."""
    path = cfg.quic.shared_secret_file
    first = workers is None or workers.index == 0
    if path:
        keys = QuicKeys.from_file(path)
        if first:
            log.info(
                "QUIC keys from quic.shared_secret_file (secret %s, %d accepted)",
                keys.fingerprint,
                len(keys.accepted),
            )
        return keys
    if workers is not None and workers.secret:
        keys = QuicKeys([workers.secret])
    else:
        keys = QuicKeys.random()
    if first:
        log.info(
            "QUIC keys: a random secret of this %s (set quic.shared_secret_file to share "
            "Retry tokens, session tickets and stateless resets across replicas)",
            "run" if workers is not None and workers.secret else "process",
        )
    return keys


def _cancel_deadline(conn: QuicConn) -> None:
    if conn.deadline is not None:
        conn.deadline.cancel()  # the handle lets go of the connection
        conn.deadline = None


def _safe(record: Callable[[], object]) -> None:
    """Metrics never break the listener."""
    try:
        record()
    except Exception:
        log.exception("recording a QUIC metric failed")


async def start_quic_listener(
    cfg: Config,
    handler: Handler,
    cert: str,
    key: str,
    host: str,
    port: int,
    reuse_port: bool,
    workers: Workers | None = None,
) -> QuicListener:
    listener = QuicListener(cfg, handler, cert, key, workers)
    try:  # before the socket is bound: no client waits for it
        listener.warmed = warm_up(listener.configuration)
    except Exception:  # never stops the start: the first client pays, as before
        log.debug("QUIC warm-up failed", exc_info=True)
    listener.bind(bind_socket(host, port, socket.SOCK_DGRAM, reuse_port))
    return listener
