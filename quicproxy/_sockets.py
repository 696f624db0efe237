"""Listening sockets: one dual-stack socket for "every address" (IPv4 and IPv6)."""

from __future__ import annotations

import socket

__all__ = ["bind_socket", "ANY"]

ANY = ""
"Host value meaning every local address, IPv4 and IPv6 alike."


def _dual_stack(kind: int, port: int) -> socket.socket | None:
    if not socket.has_ipv6:
        return None
    try:
        sock = socket.socket(socket.AF_INET6, kind)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        return sock
    except OSError:
        sock.close()
        return None


UDP_BUFFER = 4 << 20
"UDP socket buffer asked for: a burst of handshakes must not overflow the default one."


def _grow_buffers(sock: socket.socket) -> None:
    """Raise the UDP receive/send buffers (past net.core.*mem_max when allowed to)."""
    for force, plain in ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, UDP_BUFFER)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER)
            except OSError:
                pass


def bind_socket(
    host: str, port: int, kind: int, reuse_port: bool = False, backlog: int = 1024
) -> socket.socket:
    """A bound, non-blocking socket (TCP: also listening) on ``host``:``port``.

    ``host`` "" (or "::" / "0.0.0.0" when that family is missing) takes both
    families through one IPv6 socket that also accepts IPv4, so clients that try
    ::1 first (browsers do, and QUIC has no fallback) reach us as well.
    """
    sock: socket.socket | None = None
    addr: tuple[str, int] | tuple[str, int, int, int]
    if host == ANY:
        sock = _dual_stack(kind, port)
        addr = ("::", port, 0, 0)
        if sock is None:
            host = "0.0.0.0"
    if sock is None:
        info = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], kind)
        addr = info[4]  # type: ignore[assignment]
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if kind == socket.SOCK_DGRAM:
            _grow_buffers(sock)
        try:
            sock.bind(addr)
        except OSError:
            if host != ANY or sock.family != socket.AF_INET6:
                raise
            sock.close()  # IPv6 present but unusable (e.g. disabled in a pod): IPv4 only
            return bind_socket("0.0.0.0", port, kind, reuse_port, backlog)
        if kind == socket.SOCK_STREAM:
            sock.listen(backlog)  # asyncio listens again: pass it ``backlog`` as well
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def plain_addr(addr: object) -> tuple[str, int]:
    """(host, port) from a socket address, IPv4-mapped IPv6 shown as plain IPv4."""
    if not isinstance(addr, (tuple, list)) or len(addr) < 2:
        return ("", 0)
    host = str(addr[0])
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, int(addr[1]))
