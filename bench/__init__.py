"""Benchmark harness: quicproxy side by side with Caddy and the bare backend."""
