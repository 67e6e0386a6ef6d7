"""The real `grpcurl` binary against the in-process server: what an engineer debugging sees.

grpcurl runs as a subprocess through asyncio so the server, on this event loop, keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import TEST_SECRET, RunningServer
from umbra_grpc.tokens import mint_token

pytestmark = pytest.mark.asyncio(loop_scope="session")

GRPCURL = Path(sys.executable).parent / "grpcurl"
CONNECTION_SERVICE = "umbra.connections.v1.ConnectionService"
ACCOUNT_SERVICE = "umbra.accounts.v1.AccountService"
TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Result:
    """What one grpcurl run printed and how it exited."""

    code: int
    stdout: str
    stderr: str


async def grpcurl(*args: str) -> Result:
    """Runs grpcurl with `args`, killed if it takes longer than TIMEOUT_SECONDS."""
    process = await asyncio.create_subprocess_exec(
        str(GRPCURL),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), TIMEOUT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


def bearer(token: str) -> tuple[str, str]:
    return ("-H", f"authorization: Bearer {token}")


def admin_token() -> str:
    return mint_token(TEST_SECRET, subject="grpcurl-tests", scopes=["umbra.admin"])


def user_token(user_id: int) -> str:
    return mint_token(TEST_SECRET, subject=str(user_id))


async def call(server: RunningServer, token: str | None, method: str, body: object) -> Result:
    # grpcurl 1.8 prints JSON with the proto's field names (umbral_name, not umbralName).
    headers = bearer(token) if token is not None else ()
    return await grpcurl(
        "-plaintext",
        "-max-time",
        "20",
        *headers,
        "-d",
        json.dumps(body),
        server.target,
        method,
    )


async def test_list_shows_every_service(server: RunningServer) -> None:
    result = await grpcurl("-plaintext", server.target, "list")
    assert result.code == 0, result.stderr
    assert set(result.stdout.split()) == {
        CONNECTION_SERVICE,
        ACCOUNT_SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }


async def test_describe_shows_the_rpcs(server: RunningServer) -> None:
    result = await grpcurl("-plaintext", server.target, "describe", CONNECTION_SERVICE)
    assert result.code == 0, result.stderr
    for rpc in (
        "Search",
        "SendRequest",
        "ListIncomingRequests",
        "ListOutgoingRequests",
        "Respond",
        "CancelRequest",
        "ListConnections",
        "GetSharedProfile",
        "RemoveConnection",
        "BlockUser",
        "UnblockUser",
        "ListBlockedUsers",
        "GetRelationships",
    ):
        assert f"rpc {rpc} (" in result.stdout, rpc
    assert "returns ( stream .umbra.connections.v1.WatchIncomingRequestsResponse )" in (
        result.stdout
    )


async def opted_in_user(server: RunningServer, user_id: int, handle: str) -> None:
    """Creates the user through AccountService, accepting connections."""
    admin = admin_token()
    created = await call(
        server,
        admin,
        f"{ACCOUNT_SERVICE}/UpsertUser",
        {"user": {"id": user_id, "umbral_name": handle, "is_active": True}},
    )
    assert created.code == 0, created.stderr
    assert json.loads(created.stdout)["user"]["umbral_name"] == handle
    opted_in = await call(
        server,
        admin,
        f"{ACCOUNT_SERVICE}/UpdateSettings",
        {
            "user_id": user_id,
            "settings": {"accept_connections": True},
            # grpcurl 1.8 wants a FieldMask as an object, not JSON's "a,b" string form.
            "update_mask": {"paths": ["accept_connections"]},
        },
    )
    assert opted_in.code == 0, opted_in.stderr
    assert json.loads(opted_in.stdout)["settings"]["accept_connections"] is True


async def test_admin_creates_users_and_a_user_searches(server: RunningServer) -> None:
    for user_id, handle in ((501, "grpcurl.alice"), (502, "grpcurl.bob")):
        await opted_in_user(server, user_id, handle)

    found = await call(
        server, user_token(501), f"{CONNECTION_SERVICE}/Search", {"umbral_name": "GRPCURL.BOB"}
    )
    assert found.code == 0, found.stderr
    assert json.loads(found.stdout) == {"found": True}


async def test_call_without_a_token_is_unauthenticated(server: RunningServer) -> None:
    result = await call(server, None, f"{CONNECTION_SERVICE}/Search", {"umbral_name": "someone"})
    assert result.code != 0
    assert "Code: Unauthenticated" in result.stderr, result.stderr
    assert result.stdout == ""


async def test_health_check_needs_no_token(server: RunningServer) -> None:
    for service in ("", CONNECTION_SERVICE):
        result = await call(server, None, "grpc.health.v1.Health/Check", {"service": service})
        assert result.code == 0, result.stderr
        assert json.loads(result.stdout) == {"status": "SERVING"}


async def test_block_and_relationships_through_grpcurl(server: RunningServer) -> None:
    for user_id, handle in ((511, "grpcurl.carol"), (512, "grpcurl.dave")):
        await opted_in_user(server, user_id, handle)
    carol, dave = user_token(511), user_token(512)

    described = await grpcurl(
        "-plaintext", server.target, "describe", f"{CONNECTION_SERVICE}.GetRelationships"
    )
    assert described.code == 0, described.stderr
    assert "GetRelationshipsResponse" in described.stdout

    sent = await call(
        server,
        dave,
        f"{CONNECTION_SERVICE}/SendRequest",
        {"umbral_name": "grpcurl.carol", "message": "hello from grpcurl"},
    )
    assert sent.code == 0, sent.stderr
    states = await call(
        server,
        carol,
        f"{CONNECTION_SERVICE}/GetRelationships",
        {"umbral_names": ["grpcurl.dave", "nobody.here"]},
    )
    assert states.code == 0, states.stderr
    assert json.loads(states.stdout) == {
        "relationships": [
            {"umbral_name": "grpcurl.dave", "state": "RELATIONSHIP_STATE_INCOMING_PENDING"},
            {"umbral_name": "nobody.here", "state": "RELATIONSHIP_STATE_NONE"},
        ]
    }

    # A retried block with an idempotency key answers the same, as the first.
    for _ in range(2):
        blocked = await grpcurl(
            "-plaintext",
            "-max-time",
            "20",
            *bearer(carol),
            "-H",
            "idempotency-key: grpcurl-block-1",
            "-d",
            json.dumps({"umbral_name": "GRPCURL.DAVE"}),
            server.target,
            f"{CONNECTION_SERVICE}/BlockUser",
        )
        assert blocked.code == 0, blocked.stderr
        assert json.loads(blocked.stdout) == {}
    after = await call(
        server, carol, f"{CONNECTION_SERVICE}/GetRelationships", {"umbral_names": ["grpcurl.dave"]}
    )
    assert json.loads(after.stdout)["relationships"][0]["state"] == "RELATIONSHIP_STATE_BLOCKED"
    # Dave is never told: to him Carol is nobody.
    refused = await call(
        server, dave, f"{CONNECTION_SERVICE}/SendRequest", {"umbral_name": "grpcurl.carol"}
    )
    assert refused.code != 0
    assert "Code: NotFound" in refused.stderr and "USER_NOT_FOUND" in refused.stderr
    listed = await call(server, carol, f"{CONNECTION_SERVICE}/ListBlockedUsers", {})
    assert [user["umbral_name"] for user in json.loads(listed.stdout)["blocked_users"]] == [
        "grpcurl.dave"
    ]
