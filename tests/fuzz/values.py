"""The values the fuzzer draws from: boundaries, odd text, shapes hinted by a field's name.

Nothing here knows an RPC. A string field gets the shapes of the first hint its name contains
(`umbral_name`, `url`, ...), each with plausible values for valid-shaped calls and hostile
ones; every string field also gets the general odd strings. Strings are valid UTF-8, as
protobuf requires (no lone surrogates); everything else that UTF-8 can carry is fair game.
"""

from __future__ import annotations

import random
import string

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)

INT_BOUNDARIES = (
    0,
    -1,
    1,
    2,
    20,
    50,
    99,
    100,
    101,
    1000,
    1001,
    2**31 - 1,
    -(2**31),
    2**31,
    2**32,
    2**53 + 1,
    2**63 - 1,
    -(2**63),
    -(2**63) + 1,
)
FLOATS = (0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 1e308, 5e-324)

KIB = 1024
ZALGO = "Z" + "\u0336\u0321\u031b\u0354" * 40 + "a" + "\u0300" * 200
BIDI = "\u202eevil\u202c"
ZERO_WIDTH = "a\u200bb\u200cc\u200dd\u2060e\ufeff"

ODD_STRINGS: tuple[str, ...] = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\x01\x02\x1b[31m\x7f",
    "\t\n\r\x0b\x0c",
    "\u0085\u009c",
    "\u2028\u2029",
    "\ufeff",
    "\ufffd",
    "\ufffe\uffff",
    "\U0010ffff",
    "\ue000\U000f0000",
    BIDI,
    "\u2066isolate\u2069\u200f",
    ZERO_WIDTH,
    ZALGO,
    "e\u0301",
    "\U0001f469\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "\U0001f600" * 300,
    "İ",
    "ß",
    "ﬁ",
    "\u212b\u212a",
    "\uff21\uff22\uff23",
    "\u0661\u0662\u0663",
    "%s%n%x%d",
    "{}",
    "[]",
    "null",
    "' OR '1'='1' --",
    "\\",
    "../../../etc/passwd",
    "-1",
    "0",
    "9223372036854775808",
    "1e309",
    "a" * KIB,
    ("ü€\U0001f600" * (16 * KIB // 9))[: 16 * KIB],
    "x" * (63 * KIB),
    "x" * (64 * KIB),
    "é" * (32 * KIB),
)

_HANDLE_CHARS = string.ascii_lowercase + string.digits + "_.-"

# (name fragment, plausible values, hostile values); the first fragment in a name wins.
HINTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    (
        "umbral_name",
        ("abc", "a" * 50, "a.b-c_d", "z" * 3),
        (
            "ab",
            "a" * 51,
            "has space",
            "at@sign",
            "\uff46\uff55\uff4c\uff4c",
            "\u212aelvin",
            "İnci",
            "ab\u0301c",
            "a\x00bc",
            "ABC",
            "-..",
            "/../..",
        ),
    ),
    (
        "name",
        ("Ana María", "Zoë", "李小龙", "محمد", "O'Brien", "x" * 100),
        ("x" * 101, "e\u0301" * 60, BIDI, ZERO_WIDTH, "\u2066a\u2069", ZALGO, "a\nb", "\x00"),
    ),
    (
        "token",
        (),
        ("AAAA", "====", "not base64!", "a" * 200, "\U0001f600", "_-_-", "A" * 43, "A" * 64),
    ),
    (
        "url",
        ("https://1.1.1.1", "https://[2606:4700:4700::1111]/"),  # literals: no DNS lookups
        (
            "http://127.0.0.1:1/",
            "http://[::1]/",
            "http://169.254.169.254/latest",
            "http://user:pass@10.0.0.1/",
            "http://100.64.0.1",
            "https://0.0.0.0",
            "http://localhost:9/x#frag",
            "ftp://example.org",
            "http://",
            "javascript:alert(1)",
        ),
    ),
    ("topic", ("alerts", "umbra_push-1", "a" * 64), ("a" * 65, "has space", "ü", "a/b", "")),
    (
        "birthday",
        ("1990-05-17", "2000-02-29", "1970-01-01"),
        (
            "2023-02-29",
            "0000-01-01",
            "9999-12-31",
            "99999-01-01",
            "1990-5-17",
            "\u0661\u0669\u0669\u0660-01-01",
            "yesterday",
        ),
    ),
    ("email", ("ana@example.org", "x+tag@example.org"), ("@", "a" * 500 + "@x", "a" * 501)),
    ("phone", ("+34 600 000 000", "0049 30 1234"), ("+" * 500,)),
    ("mobile", ("+44 7700 900000",), ("\u202e+1",)),
    (
        "service",
        ("", "umbra.connections.v1.ConnectionService", "grpc.health.v1.Health"),
        ("nope.Service", "umbra.connections.v1.ConnectionService/Search"),
    ),
    (
        "symbol",
        ("umbra.connections.v1.ConnectionService", "umbra.accounts.v1.User"),
        ("umbra", "umbra.connections.v1.Nope", ""),
    ),
    ("filename", ("umbra/connections/v1/connections.proto",), ("../../etc/passwd", "x.proto")),
    ("type", ("umbra.accounts.v1.User",), ("google.protobuf.Any", "")),
)


def hinted(field_name: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The plausible and hostile shapes for a string field of this name (empty if none)."""
    for fragment, plausible, hostile in HINTS:
        if fragment in field_name:
            return plausible, hostile
    return (), ()


def random_handle(rng: random.Random) -> str:
    """A well-formed handle, usually nobody's."""
    return "".join(rng.choice(_HANDLE_CHARS) for _ in range(rng.randint(3, 12)))


def random_text(rng: random.Random, length: int) -> str:
    """Random code points from all planes, never a surrogate."""
    chars = []
    for _ in range(length):
        plane = rng.random()
        if plane < 0.5:
            code = rng.randint(0x20, 0x7E)
        elif plane < 0.9:
            code = rng.randint(0x80, 0xFFFF)
        else:
            code = rng.randint(0x10000, 0x10FFFF)
        if 0xD800 <= code <= 0xDFFF:
            code = 0xFFFD
        chars.append(chr(code))
    return "".join(chars)


def mutate(rng: random.Random, value: str) -> str:
    """A near miss of a real value: upper-cased, truncated, padded, spliced."""
    choice = rng.randrange(9)
    if choice == 0:
        return value.upper()
    if choice == 1:
        return value[: rng.randint(0, max(len(value) - 1, 0))]
    if choice == 2:
        return value + rng.choice(("=", "A", " ", "\x00", "\u200b", "é"))
    if choice == 3:
        return f" {value} "
    if choice == 4 and value:
        at = rng.randrange(len(value))
        return value[:at] + rng.choice(string.printable + "é\u200b") + value[at + 1 :]
    if choice == 5:
        return value * 2
    if choice == 6:
        return value[::-1]
    if choice == 7:
        return value.swapcase()
    return value + random_text(rng, rng.randint(1, 8))
