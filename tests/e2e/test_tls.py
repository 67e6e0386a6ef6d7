"""TLS and mTLS with real certificates made here: a CA, a server certificate for 127.0.0.1 and
client certificates; and `umbra-grpc demo` against such servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.certificates import Authority, Pair
from tests.e2e.test_cli import (
    CLI_SECRET,
    STARTUP_SECONDS,
    environment,
    run,
    serving,
)
from tests.support import Metadata, app_environment, test_config, until
from umbra_grpc.embedded import free_port
from umbra_grpc.pb import accounts_pb2, accounts_pb2_grpc, connections_pb2, connections_pb2_grpc
from umbra_grpc.server import Service
from umbra_grpc.storage.database import Database

on_session_loop = pytest.mark.asyncio(loop_scope="session")


class Certificates:
    """A CA with a server certificate for 127.0.0.1 and a client certificate; and a stranger
    CA whose client certificate the server must not accept."""

    def __init__(self, folder: Path) -> None:
        self.ca = Authority.create(folder)
        self.server = self.ca.issue(folder, "server", server=True)
        self.client = self.ca.issue(folder, "client")
        self.stranger = Authority.create(folder, "stranger CA").issue(folder, "stranger")


@pytest.fixture
def certificates(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


@contextlib.asynccontextmanager
async def tls_server(
    database_url: str, certificates: Certificates, *, mutual: bool
) -> AsyncIterator[str]:
    """An in-process server on TLS (mTLS when `mutual`); yields its target."""
    config = test_config(
        database_url,
        tls_cert_file=certificates.server.cert,
        tls_key_file=certificates.server.key,
        tls_client_ca_file=certificates.ca.cert_file if mutual else None,
    )
    config.validate()  # what `Config.from_env` does: the files load and match
    service = Service(config, Database.connect(config))
    await service.start()
    try:
        yield f"127.0.0.1:{service.port}"
    finally:
        await service.stop(0.5)


def credentials(certificates: Certificates, client: Pair | None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=certificates.ca.cert_file.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def health_check(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The health check's outcome on `channel`: OK (SERVING) or the error's code."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK if reply.status == reply.SERVING else grpc.StatusCode.UNAVAILABLE


async def serving_over(channel: grpc.aio.Channel) -> None:
    """Until the server says SERVING on this (accepted) channel."""

    async def serving() -> bool:
        return await health_check(channel) == grpc.StatusCode.OK

    await until(serving, within=STARTUP_SECONDS, what="SERVING over TLS", every=0.05)


@on_session_loop
async def test_tls_serves_trusting_clients_and_refuses_plaintext(
    database_url: str, certificates: Certificates, admin: Metadata
) -> None:
    async with tls_server(database_url, certificates, mutual=False) as target:
        async with grpc.aio.secure_channel(target, credentials(certificates, None)) as channel:
            await serving_over(channel)
            stub = accounts_pb2_grpc.AccountServiceStub(channel)
            user = accounts_pb2.User(id=5001, umbral_name="tls.user", is_active=True)
            reply = await stub.UpsertUser(
                accounts_pb2.UpsertUserRequest(user=user), metadata=admin, timeout=10
            )
            assert reply.user.umbral_name == "tls.user"
        async with grpc.aio.insecure_channel(target) as plaintext:
            assert await health_check(plaintext) == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA refuses it.
        distrust = grpc.ssl_channel_credentials(
            root_certificates=certificates.stranger.cert.read_bytes()
        )
        async with grpc.aio.secure_channel(target, distrust) as channel:
            assert await health_check(channel) == grpc.StatusCode.UNAVAILABLE


@on_session_loop
async def test_mtls_needs_a_client_certificate_from_the_configured_ca(
    database_url: str, certificates: Certificates
) -> None:
    async with tls_server(database_url, certificates, mutual=True) as target:
        with_cert = grpc.aio.secure_channel(target, credentials(certificates, certificates.client))
        async with with_cert as channel:
            await serving_over(channel)
        for client in (None, certificates.stranger):
            async with grpc.aio.secure_channel(target, credentials(certificates, client)) as chan:
                assert await health_check(chan) == grpc.StatusCode.UNAVAILABLE, client
        async with grpc.aio.insecure_channel(target) as plaintext:
            assert await health_check(plaintext) == grpc.StatusCode.UNAVAILABLE


def tls_environment(database_url: str, certificates: Certificates, folder: Path) -> dict[str, str]:
    return environment(
        **app_environment(database_url),
        UMBRA_JWT_SECRET=CLI_SECRET,
        UMBRA_LISTEN=f"127.0.0.1:{free_port()}",
        UMBRA_DATA_DIR=str(folder),
        UMBRA_TLS_CERT_FILE=str(certificates.server.cert),
        UMBRA_TLS_KEY_FILE=str(certificates.server.key),
    )


@on_session_loop
async def test_demo_trusts_the_configured_server_certificate(
    database_url: str, certificates: Certificates, tmp_path: Path
) -> None:
    env = tls_environment(database_url, certificates, tmp_path)
    with serving(env, tmp_path) as server:
        # Serving.wait_serving speaks plaintext; here the server answers on TLS only.
        async with grpc.aio.secure_channel(
            server.target, credentials(certificates, None)
        ) as channel:
            await serving_over(channel)
            demo = await asyncio.to_thread(run, "demo", env=env)
            assert demo.returncode == 0, demo.stderr
            assert f"grpcurl -cacert {certificates.server.cert}" in demo.stdout
            assert "-plaintext" not in demo.stdout
            alice = next(
                line.split("=", 1)[1]
                for line in demo.stdout.splitlines()
                if line.strip().startswith("export ALICE=")
            )
            found = await connections_pb2_grpc.ConnectionServiceStub(channel).Search(
                connections_pb2.SearchRequest(umbral_name="bob"),
                metadata=(("authorization", f"Bearer {alice}"),),
                timeout=10,
            )
            assert found.found
        assert server.stop(signal.SIGTERM) == 0, server.stderr[-3000:]


def test_demo_under_mtls_says_it_has_no_client_certificate(
    database_url: str, certificates: Certificates, tmp_path: Path
) -> None:
    env = tls_environment(database_url, certificates, tmp_path)
    env["UMBRA_TLS_CLIENT_CA_FILE"] = str(certificates.ca.cert_file)
    result = run("demo", env=env)
    assert result.returncode == 1
    assert "umbra-grpc demo: the server requires client certificates" in result.stderr
    assert "Traceback" not in result.stderr
