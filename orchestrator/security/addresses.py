"""Whose address a request counts against behind reverse proxies (`ClientAddresses`, pure).

The direct peer's address, unless the peer is in `rate_limit.trusted_proxies`; then the forwarded header's
(`rate_limit.forwarded_header`: `X-Forwarded-For`, or RFC 7239's `Forwarded`) right-most address that is not itself a
trusted proxy (the left-most when all are). A hop on that walk that cannot be read (garbage, `unknown`, an obfuscated
name) falls back to the peer's address: headers never fail a request. An IPv6 client is counted by its
`rate_limit.ipv6_prefix` network.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Literal

from orchestrator.settings import RateLimitSettings

_PORT = re.compile(r"[0-9]{1,5}")

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def parse_networks(text: str) -> tuple[Network, ...]:
    """`rate_limit.trusted_proxies`: comma-separated IP addresses or CIDR ranges, host bits allowed."""
    entries = (entry.strip() for entry in text.split(","))
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries if entry)


def parse_address(text: str) -> Address | None:
    """An address as proxies write one: `192.0.2.1`, `192.0.2.1:8080`, `2001:db8::1` or `[2001:db8::1]:8080`; an
    IPv4-mapped IPv6 address is its IPv4 address. None for anything else (`unknown`, `_hidden`, garbage)."""
    host = text.strip()
    if host.startswith("["):
        host, bracket, port = host[1:].partition("]")
        if not bracket or (port and not (port.startswith(":") and _PORT.fullmatch(port[1:]))):
            return None
    elif host.count(":") == 1:
        host, _, port = host.partition(":")
        if not _PORT.fullmatch(port):
            return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_nodes(value: str) -> list[str]:
    """The `for=` node of each element of an RFC 7239 `Forwarded` value, unquoted; "" for an element with none or
    several. Elements are split at every comma: a node never holds one."""
    nodes = []
    for element in value.split(","):
        pairs = (pair.partition("=") for pair in element.split(";"))
        fors = [node.strip() for name, _, node in pairs if name.strip().lower() == "for"]
        node = fors[0] if len(fors) == 1 else ""
        nodes.append(node[1:-1] if len(node) >= 2 and node[0] == node[-1] == '"' else node)
    return nodes


@dataclass(frozen=True)
class ClientAddresses:
    """Whose address a request counts against (module docstring)."""

    trusted: tuple[Network, ...] = ()
    header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    ipv6_prefix: int = 64

    @classmethod
    def from_settings(cls, settings: RateLimitSettings) -> ClientAddresses:
        return cls(parse_networks(settings.trusted_proxies), settings.forwarded_header, settings.ipv6_prefix)

    def client(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """What the limits count: the client's address (`resolve`), an IPv6 one as its `ipv6_prefix` network; a peer
        that is not an IP address (a test client's name) as the server named it, `-` for none (a Unix socket)."""
        address = parse_address(peer) if peer else None
        if address is None:
            return peer or "-"
        address = self.resolve(address, headers)
        if isinstance(address, IPv6Address) and self.ipv6_prefix < 128:
            return str(IPv6Network((address.packed, self.ipv6_prefix), strict=False))
        return str(address)

    def resolve(self, peer: Address, headers: Iterable[tuple[bytes, bytes]]) -> Address:
        """`peer`, unless it is a trusted proxy; then, from the right of the forwarded header, the first hop that is
        not a trusted proxy (the left-most hop when all are), or `peer` when a hop on the way cannot be read."""
        if not self.trusts(peer):
            return peer
        client = peer
        for hop in reversed(self.hops(headers)):
            if hop is None:
                return peer
            client = hop
            if not self.trusts(hop):
                return hop
        return client

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.trusted)

    def hops(self, headers: Iterable[tuple[bytes, bytes]]) -> list[Address | None]:
        """The addresses in the forwarded header, left (farthest) to right (nearest): its fields joined in order, as
        one; None where an entry is not an address."""
        name = self.header.encode()
        fields = [value.decode("latin-1") for key, value in headers if key.lower() == name]
        if not fields:
            return []
        joined = ",".join(fields)
        nodes = forwarded_nodes(joined) if self.header == "forwarded" else joined.split(",")
        return [parse_address(node) for node in nodes]
