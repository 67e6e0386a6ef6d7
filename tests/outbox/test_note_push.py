"""A request's note never reaches a push (SPEC 11): ntfy is a third party, and the note is
for the receiver's eyes in the service only. The push of a request with a note is delivered
to a recording ntfy and searched for it: path, headers and body."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from tests.outbox.recorder import NtfyRecorder
from tests.outbox.support import config
from tests.support import (
    Accounts,
    Connections,
    Metadata,
    NewUser,
    RunningServer,
    start_server,
    stop_server,
)
from umbra_grpc.pb import accounts_pb2, connections_pb2

pytestmark = pytest.mark.asyncio(loop_scope="session")
pb = connections_pb2
NOTE = "my-secret-note: we met at the lake"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(database_url: str) -> AsyncIterator[RunningServer]:
    running = await start_server(config(database_url))
    try:
        yield running
    finally:
        await stop_server(running)


async def test_the_push_of_a_request_with_a_note_carries_no_note(
    connections: Connections,
    accounts: Accounts,
    admin: Metadata,
    new_user: NewUser,
    recorder: NtfyRecorder,
) -> None:
    sender, receiver = await new_user(preferred_name="Sam"), await new_user()
    topic = f"note-{receiver.id}"
    await accounts.UpdateSettings(
        accounts_pb2.UpdateSettingsRequest(
            user_id=receiver.id,
            settings=accounts_pb2.Settings(
                ntfy=accounts_pb2.NtfySettings(
                    enabled=True, server_url=recorder.url, topic=topic, connections_enabled=True
                )
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["ntfy"]),
        ),
        metadata=admin,
    )
    await connections.SendRequest(
        pb.SendRequestRequest(umbral_name=receiver.handle, message=NOTE), metadata=sender.md
    )
    [pushed] = await recorder.wait_for(topic, 1)
    assert pushed.body == "Sam wants to connect with you"
    everything = " ".join([pushed.path, pushed.body, *pushed.headers.values()])
    assert "secret-note" not in everything and "lake" not in everything
