"""HTTP semantics at the edge: what every protocol refuses, and with which status."""

from __future__ import annotations

import pytest

from quicproxy._errors import BadRequest
from quicproxy._model import Body
from quicproxy._pseudo import request_from_pseudo
from tests.helpers import fetch
from tests.hostile.raw import body_of, exchange, h2_request, h3_request, status_of

PROTOCOLS = ["h1", "h2", "h3"]


def reached(backend, path: str) -> list:
    return [r for r in backend.requests if r[1].startswith(path)]


def request_block(
    method: bytes, path: bytes, authority: bytes = b"localhost", *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    """An h2/h3 request header block, sent as given."""
    pseudo = [(b":method", method), (b":scheme", b"https"), (b":authority", authority)]
    return pseudo + [(b":path", path), *extra]


async def plain(proxy, head: bytes) -> bytes:
    return await exchange(proxy.http_port, head, timeout=3)


@pytest.fixture
async def edge(make_proxy, backend):
    """A proxy whose plain port forwards (so h1 requests can reach the backend)."""
    return await make_proxy(backend, listen={"plain_http": "proxy"})


async def test_content_length_with_transfer_encoding_is_400_and_closed(edge, backend):
    head = (
        b"POST /smuggle HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: localhost\r\n\r\n"
    )
    answer = await plain(edge, head)
    assert status_of(answer) == 400
    assert answer.count(b"HTTP/1.1") == 1  # closed: the smuggled second request got nothing
    assert b"connection: close" in answer.lower()
    assert not reached(backend, "/smuggle") and not reached(backend, "/second")


async def test_connect_is_refused_with_501_on_h1(edge, backend):
    answer = await plain(edge, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
    assert status_of(answer) == 501
    assert body_of(answer) == b"501 Not Implemented\n"
    assert backend.requests == []


async def test_connect_is_refused_with_501_on_h2(edge, certs, backend):
    head = [(b":method", b"CONNECT"), (b":authority", b"example.com:443")]
    status, body, how = await h2_request(edge, certs, head)
    assert (status, body, how) == (501, b"501 Not Implemented\n", "ended")
    assert backend.requests == []


async def test_connect_is_refused_with_501_on_h3(edge, certs, backend):
    head = [(b":method", b"CONNECT"), (b":authority", b"example.com:443")]
    assert await h3_request(edge, certs, head) == (501, b"501 Not Implemented\n")
    assert backend.requests == []


async def test_absolute_form_for_the_same_host_goes_on_as_origin_form(edge, backend):
    head = b"GET http://Localhost/abs?q=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    answer = await plain(edge, head)
    assert status_of(answer) == 200
    [(method, target, headers)] = reached(backend, "/abs")
    assert target == "/abs?q=1"
    assert dict(headers)["host"] == "Localhost"


async def test_absolute_form_for_another_host_is_400(edge, backend):
    head = b"GET http://internal.example/admin HTTP/1.1\r\nHost: localhost\r\n\r\n"
    assert status_of(await plain(edge, head)) == 400
    assert backend.requests == []


async def test_options_star_is_answered_by_the_proxy(edge, backend):
    head = b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    answer = await plain(edge, head)
    assert status_of(answer) == 200
    assert b"allow: get, head" in answer.lower()
    assert backend.requests == []


@pytest.mark.parametrize("target", [b"*", b"admin", b"example.com:80", b"//x"])
async def test_targets_that_are_not_origin_form_are_400(edge, backend, target):
    answer = await plain(edge, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    expected = 200 if target == b"//x" else 400  # //x is a path (empty first segment)
    assert status_of(answer) == expected
    assert all(r[1] == "//x" for r in backend.requests)


async def test_path_without_slash_is_400_on_h2_and_h3(edge, certs, backend):
    head = request_block(b"GET", b"admin")
    assert (await h2_request(edge, certs, head))[0] == 400
    assert (await h3_request(edge, certs, head))[0] == 400
    assert backend.requests == []


async def test_http_2_0_on_the_h1_port_is_505(edge, backend):
    answer = await plain(edge, b"GET / HTTP/2.0\r\nHost: localhost\r\n\r\n")
    assert status_of(answer) == 505
    assert body_of(answer) == b"505 HTTP Version Not Supported\n"
    assert backend.requests == []


@pytest.mark.parametrize(
    "host", [b"evil.example/x?", b"a@evil.example", b"evil.example:99999", b"[zz]", b"a b"]
)
async def test_bad_host_is_400_never_a_redirect(proxy, backend, host):
    answer = await exchange(proxy.http_port, b"GET /login HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert status_of(answer) == 400
    assert b"location" not in answer.lower()
    assert backend.requests == []


async def test_good_host_still_redirects(proxy):
    head = b"GET /a HTTP/1.1\r\nHost: [::1]:80\r\n\r\n"
    answer = await exchange(proxy.http_port, head, timeout=1)
    assert status_of(answer) == 308
    assert f"location: https://[::1]:{proxy.https_port}/a".encode() in answer.lower()


@pytest.mark.parametrize("proto", ["h2", "h3"])
async def test_bad_authority_is_400_on_h2_and_h3(edge, certs, backend, proto):
    head = request_block(b"GET", b"/", b"evil.example/x?")
    if proto == "h2":
        assert (await h2_request(edge, certs, head))[:2] == (400, b"400 Bad Request\n")
    else:
        assert await h3_request(edge, certs, head) == (400, b"400 Bad Request\n")
    assert backend.requests == []


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_502_body_does_not_name_the_upstream(make_proxy, certs, proto):
    from tests.helpers import free_port

    port = free_port()
    proxy = await make_proxy(None, backend=f"http://127.0.0.1:{port}")
    status, _, body = await fetch(proxy, certs, proto, "GET", "/")
    assert (status, body) == (502, b"502 Bad Gateway\n")
    assert str(port).encode() not in body


@pytest.mark.parametrize("value", [b"caf\xe9", b"\xff\xfe", b"a\x01b"])
async def test_non_utf8_and_control_header_bytes_are_400_on_h1(edge, backend, value):
    head = b"GET /bytes HTTP/1.1\r\nHost: localhost\r\nX-Odd: " + value + b"\r\n\r\n"
    answer = await plain(edge, head)
    assert status_of(answer) == 400
    assert not reached(backend, "/bytes")


NON_UTF8 = [
    ("h2", b"caf\xe9"),
    ("h2", b"\xff\xfe"),
    ("h3", b"caf\xe9"),
    ("h3", b"\xff\xfe"),
]


@pytest.mark.parametrize(("proto", "value"), NON_UTF8)
async def test_non_utf8_header_bytes_are_400_on_h2_and_h3(edge, certs, backend, proto, value):
    head = request_block(b"GET", b"/bytes", b"localhost", (b"x-odd", value))
    if proto == "h2":
        assert (await h2_request(edge, certs, head))[:2] == (400, b"400 Bad Request\n")
    else:
        assert await h3_request(edge, certs, head) == (400, b"400 Bad Request\n")
    assert not reached(backend, "/bytes")
    assert (await fetch(edge, certs, proto, "GET", "/after"))[0] == 200


@pytest.mark.parametrize("proto", ["h1", "h2", "h3"])
async def test_utf8_header_bytes_pass_on_every_protocol(edge, certs, backend, proto):
    """UTF-8 text in a value (obs-text, RFC 9110 §5.5) is the same request on every
    protocol: passed on, byte for byte."""
    value = "café 東京".encode()
    if proto == "h1":
        head = b"GET /bytes HTTP/1.1\r\nHost: localhost\r\nX-Odd: " + value + b"\r\n\r\n"
        assert status_of(await plain(edge, head)) == 200
    else:
        head = request_block(b"GET", b"/bytes", b"localhost", (b"x-odd", value))
        send = h2_request if proto == "h2" else h3_request
        assert (await send(edge, certs, head))[0] == 200
    seen = [h for m, t, h in backend.requests if t == "/bytes"]
    assert seen and dict(seen[-1])["x-odd"] == value.decode()


@pytest.mark.parametrize("proto", PROTOCOLS)
async def test_too_many_header_fields_is_431(make_proxy, backend, certs, proto):
    proxy = await make_proxy(backend, limits={"max_headers": 20})
    many = [(f"x-h{i}", "v") for i in range(25)]
    status, _, body = await fetch(proxy, certs, proto, "GET", "/many", headers=many)
    assert (status, body) == (431, b"431 Request Header Fields Too Large\n")
    few = [(f"x-h{i}", "v") for i in range(10)]
    assert (await fetch(proxy, certs, proto, "GET", "/few", headers=few))[0] == 200
    assert not reached(backend, "/many") and reached(backend, "/few")


async def test_a_content_length_that_only_looks_numeric_is_400_on_h1(edge, backend):
    # "²" passes str.isdigit() but int() refuses it: it must be a 400, not a crash.
    head = b"POST /sup HTTP/1.1\r\nHost: localhost\r\nContent-Length: \xb2\r\n\r\nab"
    assert status_of(await plain(edge, head)) == 400
    assert not reached(backend, "/sup")


async def test_a_content_length_that_only_looks_numeric_is_refused_on_h2(edge, certs, backend):
    # jh2 refuses it as malformed (a connection error); the request model would too.
    head = request_block(b"POST", b"/sup", b"localhost", (b"content-length", "²".encode()))
    assert (await h2_request(edge, certs, head))[0] in (0, 400)
    assert not reached(backend, "/sup")
    assert (await fetch(edge, certs, "h2", "GET", "/after"))[0] == 200
    with pytest.raises(BadRequest):
        request_from_pseudo(
            [(k.decode(), v.decode()) for k, v in head], "HTTP/3", ("a", 1), ("b", 2), Body.empty()
        )
