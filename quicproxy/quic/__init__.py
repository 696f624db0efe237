"""The QUIC side of the https port: HTTP/3 over qh3, from datagrams to requests.

- ``_core.py``: the one module that knows qh3's internals (its ``PRIVATE`` list is checked
  by a test): headers, Initial checks, Retry, Version Negotiation, stateless reset, session
  tickets, the connection object with its frame budget and stream credit;
- ``_packet.py``: qh3's packet builder with a short path for 1-RTT packets (part of the core);
- ``_keys.py``: the QUIC secret (``quic.shared_secret_file``) and the keys derived from it;
- ``_udp.py``: the UDP socket (GSO batching, the address each datagram was sent to);
- ``_listen.py``: the listener: datagrams to connections by connection ID, caps, admission,
  hand-over between workers, output batched once per loop turn;
- ``_conn.py``: one owner per connection (transport state, timer, transmit); the listener
  drives it, and it calls the listener back only through the ``Host`` interface;
- ``_h3.py``: one QUIC connection's HTTP/3 events to the request model (on ``_conn``);
- ``_h3gate.py``: HTTP/3 request frames read before qh3 (sizes, QPACK without a table).

Nothing is imported here: ``_config`` needs ``_keys`` while the listener needs ``_config``.
"""
