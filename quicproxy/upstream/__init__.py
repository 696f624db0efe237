"""The upstream side, mirroring the listeners: where a request goes and how it is spoken.

- ``_member.py``: members (scheme, host, port, TLS profile), the pool key, and the client
  TLS of ``https://`` members (verification, mTLS, session resumption);
- ``_h1.py``: the keep-alive HTTP/1.1 pool (``http://``, ``https://``; the WAF service
  client's too), bodies streamed both ways, the connection caps, the at-most-once
  delivery rule;
- ``_h2.py``: multiplexed HTTP/2 connections (``h2c://``, and ``https://`` members whose
  ALPN chose h2) under the same caps;
- ``_tunnel.py``: WebSocket tunnels, an HTTP/1.1 Upgrade to the backend whatever the
  client spoke;
- ``_balance.py``: a route's pool of members and the choice of one per request
  (least_request, round_robin, hash; weights);
- ``_health.py``: passive outlier ejection, active probes, the all-down 503;
- ``_retry.py``: retries on another member and the per-route retry budget.

Nothing is imported here: ``_config`` needs ``_member`` while the pools need ``_config``.
"""
