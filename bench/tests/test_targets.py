"""Harness helpers that need no server."""

from __future__ import annotations

import os

from bench.targets import free_ports, proc_tree_rss_kib


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5


def test_rss_of_own_process_tree() -> None:
    assert proc_tree_rss_kib(os.getpid()) > 1000
