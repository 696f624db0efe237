"""A real gRPC server (grpcio) with bytes in and out, no .proto: run as
``python -m tests.grpc_backend`` it serves on an insecure loopback port (the proxy's
``h2c://`` backend), or with ``--tls CERT KEY`` behind TLS (an ``https://`` backend:
grpcio offers h2 alone by ALPN), prints the port and runs until killed. Its own process, so a test
can kill it mid-stream and the proxy's event loop does not share a GIL with it.

Methods of ``test.Echo``: Unary (echo, with trailing metadata ``x-trailer``),
ServerStream (request ``N``: N numbered messages; ``N:delay``: one every delay
seconds), ClientStream (the count and total size of the messages), Bidi (each
message echoed as it comes, trailing metadata ``x-count``), Sleep (sleeps the
request's seconds, then answers).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

SERVICE = "test.Echo"


def unary(request: bytes, context: Any) -> bytes:
    context.set_trailing_metadata((("x-trailer", "unary-done"),))
    return b"echo:" + request


def server_stream(request: bytes, context: Any) -> Iterator[bytes]:
    count, _, delay = request.decode().partition(":")
    for i in range(int(count)):
        if delay:
            time.sleep(float(delay))
        yield b"%d" % i


def client_stream(requests: Iterator[bytes], context: Any) -> bytes:
    count = size = 0
    for message in requests:
        count += 1
        size += len(message)
    return b"%d %d" % (count, size)


def bidi(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
    count = 0
    for message in requests:
        count += 1
        yield message
    context.set_trailing_metadata((("x-count", str(count)),))


def sleep(request: bytes, context: Any) -> bytes:
    time.sleep(float(request.decode()))
    return b"late"


def handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
        },
    )


def main() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handlers(),))
    if sys.argv[1:2] == ["--tls"]:
        cert, key = (Path(name).read_bytes() for name in sys.argv[2:4])
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key, cert)]))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    sys.stdin.read()  # until the test closes our stdin (or kills us)
    server.stop(0)


@contextlib.contextmanager
def grpc_backend(tls: tuple[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """This server in its own process (behind TLS with ``tls``'s certificate and key);
    ``proc.port`` is its port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.grpc_backend", *(["--tls", *tls] if tls else [])],
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.port = int(proc.stdout.readline())  # type: ignore[attr-defined]
        yield proc
    finally:
        with contextlib.suppress(Exception):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
