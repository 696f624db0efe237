"""Response fields as h2 and h3 send them: the one normalisation both protocols get
(jh2's own outbound pass is off)."""

from __future__ import annotations

from quicproxy._pseudo import response_headers


def test_names_lower_values_trimmed_connection_fields_dropped_status_first():
    fields = [
        ("Content-Type", " text/plain \t"),
        ("Connection", "close, X-Hop"),
        ("x-hop", "dropped: named by Connection"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("TE", "trailers"),
        ("Set-Cookie", "a=1"),
        ("set-cookie", "b=2"),
    ]
    assert response_headers(204, fields) == [
        (b":status", b"204"),
        (b"content-type", b"text/plain"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]


def test_latin1_values_are_kept_byte_for_byte():
    assert response_headers(200, [("x-name", "caf\xe9")]) == [
        (b":status", b"200"),
        (b"x-name", b"caf\xe9"),
    ]
