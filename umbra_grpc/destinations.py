"""Where pushes may go: the rule for a user's ntfy `server_url` (SPEC 10.4, no SSRF).

The URL is typed by someone else, and the service POSTs to it from inside its own network;
without a rule it could be made to reach the cloud metadata endpoint, the metrics port or
any host on the LAN. The rule:

- Syntax: `http` or `https`, a host, and nothing that travels besides the host and path:
  no userinfo (httpx would turn it into a Basic header), no query, no fragment. The URL is
  parsed by httpx, the parser the sender uses, so the check and the send agree on the host.
- Address: the host, as an address (in any spelling the system resolver accepts: decimal
  `2130706433`, hex `0x7f.1`, `[::1]`, `::ffff:127.0.0.1`) or as the names it resolves to,
  must only reach public unicast space: one loopback, private (RFC 1918, fc00::/7),
  link-local, CGNAT (100.64.0.0/10), multicast, unspecified or reserved address among them
  refuses it. IPv4 inside IPv6 (mapped, 6to4, NAT64) is judged as the IPv4 it reaches.
  `localhost` and `*.localhost` are refused by name (RFC 6761), trailing dots ignored.
- Escape hatch: an address inside UMBRA_NTFY_ALLOWED_NETWORKS is allowed anyway (self-hosted
  ntfy on a LAN; the tests' recorder on 127.0.0.1).

Save time (`check_for_saving`): a name that does not resolve (or not within
`SAVE_RESOLVE_SECONDS`) is accepted; it is judged when a push goes out. Send time
(`addresses`, used by the ntfy client's connector): the name is resolved once, every address
judged, and the connection made to one of exactly those addresses, so no second lookup can
answer differently between the check and the connect (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Final

import httpx

from umbra_grpc.peer import Address, Network

SAVE_RESOLVE_SECONDS: Final = 2.0
_CGNAT: Final = ipaddress.IPv4Network("100.64.0.0/10")
_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")

# (host, port) -> the addresses it resolves to, as text; OSError when it does not resolve.
Resolver = Callable[[str, int], Awaitable[list[str]]]


class ForbiddenDestination(Exception):
    """The rule refuses this destination; the message says why (it never holds a secret)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where a server URL points: scheme, host (as httpx sends it) and port."""

    scheme: str
    host: str
    port: int


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's answer (getaddrinfo: /etc/hosts, DNS, numeric spellings), in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def parse(url: str) -> Target:
    """The target of a server URL; `ForbiddenDestination` when its form is not allowed."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError):
        raise ForbiddenDestination("is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise ForbiddenDestination("must be an http or https URL")
    if parsed.userinfo or "@" in url.partition("://")[2].partition("/")[0]:
        raise ForbiddenDestination("must not hold a user name or password")
    if parsed.query or "?" in url:
        raise ForbiddenDestination("must not have a query")
    if parsed.fragment or "#" in url:
        raise ForbiddenDestination("must not have a fragment")
    host = parsed.raw_host.decode("ascii")
    if not host.rstrip("."):
        raise ForbiddenDestination("has no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return Target(parsed.scheme, host, port)


def forbidden_category(address: Address) -> str | None:
    """Why an address is no push destination ("loopback", ...), or None when it is public.

    Judges the address as written: IPv4 inside IPv6 is unwrapped by `Destinations.judge`.
    """
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_multicast:
        return "multicast"
    if address.is_unspecified:
        return "unspecified"
    if address in _CGNAT:
        return "shared (CGNAT)"
    if address.is_private:
        return "private"
    site_local = address.version == 6 and address.is_site_local
    if address.is_reserved or site_local or not address.is_global:
        return "reserved"
    return None


def _reached(address: Address) -> tuple[Address, ...]:
    """The address and the IPv4 addresses it stands for (mapped, 6to4, NAT64)."""
    if address.version == 4:
        return (address,)
    if address.ipv4_mapped is not None:
        return (address.ipv4_mapped,)
    embedded: list[Address] = [address]
    if address.sixtofour is not None:
        embedded.append(address.sixtofour)
    if address in _NAT64:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF))
    return tuple(embedded)


class Destinations:
    """The rule with its allowed networks and its resolver (see the module doc)."""

    def __init__(
        self, allowed: Iterable[Network] = (), resolver: Resolver = system_resolver
    ) -> None:
        self._allowed: Sequence[Network] = tuple(allowed)
        self._resolver = resolver

    def judge(self, text: str) -> None:
        """Raises `ForbiddenDestination` unless the address may be connected to."""
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise ForbiddenDestination(f"resolved to a non-address ({text!r})") from None
        for reached in _reached(address):
            category = forbidden_category(reached)
            if category is not None and not any(reached in net for net in self._allowed):
                article = "an" if category[0] in "aeiou" else "a"
                raise ForbiddenDestination(f"reaches {article} {category} address ({reached})")

    async def addresses(self, host: str, port: int) -> list[str]:
        """Resolves `host` once and judges every address; the addresses to connect to.

        Raises `ForbiddenDestination`, or OSError when the name does not resolve.
        """
        name = host.rstrip(".").lower()
        if name == "localhost" or name.endswith(".localhost"):
            raise ForbiddenDestination("names a localhost address")
        try:  # an address written canonically needs no lookup
            found = [str(ipaddress.ip_address(name))]
        except ValueError:
            found = await self._resolver(name, port)
        if not found:
            raise OSError(f"{name} resolves to no address")
        for address in found:
            self.judge(address)
        return found

    async def check_for_saving(self, url: str) -> None:
        """The save-time check: form, then addresses; a name that does not resolve passes."""
        target = parse(url)
        try:
            async with asyncio.timeout(SAVE_RESOLVE_SECONDS):
                await self.addresses(target.host, target.port)
        except (OSError, TimeoutError):
            return  # judged at send time
