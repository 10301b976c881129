"""The host names a server answers to, shared by the CLI (which must not import the web packages) and the
app: the loopback names always answered, and one spelling of a name (lower case, no brackets, an IP address
in its short form)."""

from __future__ import annotations

import ipaddress

__all__ = ["LOOPBACK_NAMES", "bare_host"]

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def bare_host(name: str) -> str:
    """`name` as the Host check compares it: stripped, lower case, `[v6]` brackets off, an IP address
    in its compressed form (`0:0::1` -> `::1`)."""
    bare = name.strip().lower()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    try:
        return ipaddress.ip_address(bare).compressed
    except ValueError:
        return bare
