"""The push destination rule (SPEC 10.4) on its own: forms, addresses, names, allow-list.

Names are answered by a dict (no DNS); literal addresses go through the system resolver,
which parses every spelling itself without asking DNS.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from umbra_grpc.destinations import (
    Destinations,
    ForbiddenDestination,
    forbidden_category,
    parse,
    system_resolver,
)

asynchronous = pytest.mark.asyncio(loop_scope="session")

NAMES = {
    "ntfy.example": ["93.184.216.34"],
    "lan.example": ["10.1.2.3"],
    "mixed.example": ["93.184.216.34", "10.0.0.1"],
    "v6.example": ["2606:4700::6810:85e5", "fd00::1"],
}


async def resolve(host: str, port: int) -> list[str]:
    if host in NAMES:
        return NAMES[host]
    return await system_resolver(host, port)


FORBIDDEN_URLS = [
    "http://127.0.0.1/",
    "http://127.0.0.1:8080/metrics",
    "http://2130706433/",  # decimal
    "http://0x7f.1/",  # hex, short form
    "http://127.1/",
    "http://017700000001/",  # octal
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",  # IPv4-mapped IPv6
    "http://[::ffff:7f00:1]/",
    "http://[2002:7f00:1::]/",  # 6to4 of 127.0.0.1
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 of 169.254.169.254
    "http://localhost/",
    "http://LOCALHOST:80/",
    "http://localhost./",  # trailing dot
    "http://ntfy.localhost/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://169.254.169.254/latest/meta-data",
    "http://100.64.0.1/",  # CGNAT
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://240.0.0.1/",  # reserved
    "http://255.255.255.255/",
    "http://192.0.2.7/",  # documentation
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[fec0::1]/",  # site-local
    "http://lan.example/",
    "http://lan.example./",
    "http://mixed.example/",  # one private address among public ones is enough
    "http://v6.example/",
    # Forms
    "ftp://ntfy.example/",
    "file:///etc/passwd",
    "ntfy.example",
    "http://user:pass@ntfy.example/",
    "http://user@ntfy.example/",
    "http://:@ntfy.example/",
    "http://ntfy.example\\@127.0.0.1/",
    "http://ntfy.example/#fragment",
    "http://ntfy.example/#",
    "http://ntfy.example/?q=1",
    "http:///path",
    "http://0177.0.0.1/",  # httpx refuses this spelling outright
]

ALLOWED_URLS = [
    "https://ntfy.example",
    "https://ntfy.example/base/path",
    "http://93.184.216.34:8080",
    "http://[2606:4700::6810:85e5]/",
    "https://nowhere.invalid",  # does not resolve: judged at send time
]


@pytest.mark.parametrize("url", FORBIDDEN_URLS)
@asynchronous
async def test_forbidden_urls_are_refused_at_save_time(url: str) -> None:
    with pytest.raises(ForbiddenDestination):
        await Destinations(resolver=resolve).check_for_saving(url)


@pytest.mark.parametrize("url", ALLOWED_URLS)
@asynchronous
async def test_public_and_unresolvable_urls_are_accepted(url: str) -> None:
    await Destinations(resolver=resolve).check_for_saving(url)


@asynchronous
async def test_allowed_networks_open_exactly_their_addresses() -> None:
    allowed = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.1.0.0/16")]
    destinations = Destinations(allowed, resolver=resolve)
    for url in ("http://127.0.0.1:9/", "http://[::ffff:127.0.0.1]/", "http://lan.example/"):
        await destinations.check_for_saving(url)
    for url in ("http://[::1]/", "http://10.2.0.1/", "http://mixed.example/", "http://localhost"):
        with pytest.raises(ForbiddenDestination):
            await destinations.check_for_saving(url)


@asynchronous
async def test_send_time_addresses_are_the_judged_ones() -> None:
    destinations = Destinations(resolver=resolve)
    assert await destinations.addresses("ntfy.example", 443) == ["93.184.216.34"]
    with pytest.raises(ForbiddenDestination, match="private"):
        await destinations.addresses("mixed.example", 443)
    with pytest.raises(socket.gaierror):
        await destinations.addresses("nowhere.invalid", 443)


@pytest.mark.parametrize(
    ("address", "category"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("fd12::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("100.127.255.254", "shared (CGNAT)"),
        ("239.1.1.1", "multicast"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address to judge, not to bind
        ("240.0.0.1", "private"),  # Python counts 240/4 as private and reserved
        ("93.184.216.34", None),
        ("2606:4700::1", None),
    ],
)
def test_categories(address: str, category: str | None) -> None:
    assert forbidden_category(ipaddress.ip_address(address)) == category


def test_parse_keeps_the_host_httpx_connects_to() -> None:
    target = parse("HTTPS://Ntfy.Example.:8443/base")
    assert (target.scheme, target.host, target.port) == ("https", "ntfy.example.", 8443)
    assert parse("http://[::1]").host == "::1"
