"""The client's address: the connection's peer, or X-Forwarded-For behind trusted proxies.

`x-forwarded-for` is believed only when the connection comes from a configured trusted
proxy (UMBRA_TRUSTED_PROXIES); then the rightmost address that is not itself a trusted proxy
is the client. Anyone else could write any address into that header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """CIDRs or single addresses; ValueError on anything else."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items)


def peer_address(peer: str) -> Address | None:
    """The IP in a grpc peer string (`ipv4:1.2.3.4:5`, `ipv6:[::1]:5`); None for unix sockets."""
    kind, _, rest = peer.partition(":")
    try:
        if kind == "ipv4":
            return ipaddress.ip_address(rest.rpartition(":")[0])
        if kind == "ipv6":
            return ipaddress.ip_address(rest.rpartition(":")[0].strip("[]"))
    except ValueError:
        return None
    return None


def client_address(peer: str, forwarded_for: str | None, trusted: Sequence[Network]) -> str | None:
    """The client's IP as text, or None when it cannot be told (unix socket)."""
    address = peer_address(peer)
    if address is None or not forwarded_for or not _is_trusted(address, trusted):
        return str(address) if address is not None else None
    for hop in reversed([part.strip() for part in forwarded_for.split(",")]):
        try:
            hop_address = ipaddress.ip_address(hop)
        except ValueError:
            break
        address = hop_address
        if not _is_trusted(hop_address, trusted):
            break
    return str(address)


def _is_trusted(address: Address, trusted: Sequence[Network]) -> bool:
    return any(address in network for network in trusted)
