"""Pure pieces of delivery: backoff, Retry-After, what an answer means, message texts."""

from __future__ import annotations

import email.utils
import random

import pytest

from umbra_grpc.outbox import ntfy
from umbra_grpc.outbox.worker import backoff_ceiling, full_jitter, retry_delay
from umbra_grpc.storage.outbox import ClaimedPush

NOW = 1_750_000_000.0


def test_backoff_doubles_from_base_up_to_cap() -> None:
    ceilings = [backoff_ceiling(n, base=0.5, cap=30.0) for n in range(1, 10)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff_ceiling(10_000, base=0.5, cap=30.0) == 30.0


def test_full_jitter_spans_zero_to_ceiling() -> None:
    random.seed(6)
    draws = [full_jitter(2.0) for _ in range(2000)]
    assert all(0.0 <= draw <= 2.0 for draw in draws)
    assert min(draws) < 0.1
    assert max(draws) > 1.9


def test_retry_delay_uses_jitter_and_never_undercuts_retry_after() -> None:
    def top(ceiling: float) -> float:
        return ceiling

    def bottom(ceiling: float) -> float:
        return 0.0

    assert retry_delay(3, base=0.5, cap=30.0, retry_after=None, jitter=top) == 2.0
    assert retry_delay(3, base=0.5, cap=30.0, retry_after=None, jitter=bottom) == 0.0
    assert retry_delay(1, base=0.5, cap=30.0, retry_after=7.0, jitter=top) == 7.0
    assert retry_delay(8, base=0.5, cap=30.0, retry_after=7.0, jitter=top) == 30.0


@pytest.mark.parametrize("attempt", [1, 3, 6, 8, 40])
@pytest.mark.parametrize("retry_after", [0.0, 0.4, 7.0, 30.0, 90.0])
def test_no_jitter_draw_undercuts_retry_after(attempt: int, retry_after: float) -> None:
    """The whole jitter range, bottom to top, and Retry-After below, inside and above the
    cap: the wait is the draw, or Retry-After when the draw is shorter, never less."""
    for step in range(101):
        fraction = step / 100

        def draw(ceiling: float, fraction: float = fraction) -> float:
            return ceiling * fraction

        drawn = backoff_ceiling(attempt, base=0.5, cap=30.0) * fraction
        delay = retry_delay(attempt, base=0.5, cap=30.0, retry_after=retry_after, jitter=draw)
        assert delay == max(drawn, retry_after), (fraction, delay)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("1", 1.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("-5", 0.0),
        ("1e9", ntfy.MAX_RETRY_AFTER_SECONDS),
        ("inf", ntfy.MAX_RETRY_AFTER_SECONDS),
        (email.utils.formatdate(NOW + 90, usegmt=True), 90.0),
        (email.utils.formatdate(NOW - 90, usegmt=True), 0.0),
        ("Wed, 21 Oct 2015 07:28:00", 0.0),
        ("nan", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_seconds(header: str | None, seconds: float | None) -> None:
    assert ntfy.retry_after_seconds(header, now=lambda: NOW) == seconds


@pytest.mark.parametrize("status", [200, 201, 204])
def test_2xx_is_delivered(status: int) -> None:
    assert ntfy.classify(status, None, "") == ntfy.Delivered(status)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_5xx_is_retried(status: int) -> None:
    result = ntfy.classify(status, None, "oops")
    assert result == ntfy.Retry(f"HTTP {status}: oops")


def test_429_is_retried_with_its_retry_after() -> None:
    result = ntfy.classify(429, "3", "")
    assert isinstance(result, ntfy.Retry)
    assert result.retry_after == 3.0


@pytest.mark.parametrize("status", [301, 400, 401, 403, 404, 408, 410, 413])
def test_everything_else_is_permanent(status: int) -> None:
    assert isinstance(ntfy.classify(status, "5", ""), ntfy.Rejected)


def test_error_snippet_is_bounded_one_line_and_without_token() -> None:
    token = "tk_" + "s" * 40
    # The token straddles the snippet boundary: no piece of it may remain.
    body = "a" * (ntfy.BODY_SNIPPET_CHARS - 10) + token + "\n" + "b" * 5000
    result = ntfy.classify(403, None, body, token)
    assert isinstance(result, ntfy.Rejected)
    assert "sss" not in result.error
    assert "\n" not in result.error
    assert len(result.error) <= ntfy.ERROR_CHARS
    assert ntfy.short("x" * 1000) == "x" * (ntfy.ERROR_CHARS - 3) + "..."


def test_messages_as_the_router_phrased_them() -> None:
    assert ntfy.message_for("request_received", "Ada") == ntfy.Message(
        "New Connection Request", "handshake", "Ada wants to connect with you"
    )
    assert ntfy.message_for("request_accepted", "Ada") == ntfy.Message(
        "Connection Accepted", "white_check_mark", "Ada accepted your connection request"
    )
    assert ntfy.message_for("something_else", "Ada") is None


def test_topic_url_keeps_the_topic_one_segment() -> None:
    assert ntfy.topic_url("https://ntfy.sh/", "alerts") == "https://ntfy.sh/alerts"
    assert ntfy.topic_url("https://ntfy.sh", "../a/b?c") == "https://ntfy.sh/..%2Fa%2Fb%3Fc"


def test_claimed_push_never_prints_its_token() -> None:
    push = ClaimedPush(
        id=1,
        user_id=2,
        kind="request_received",
        display_name="Ada",
        attempt=1,
        server_url="https://ntfy.example",
        topic="t",
        auth_token="tk_never_printed",
    )
    assert "tk_never_printed" not in repr(push)
    assert "tk_never_printed" not in str(push)
