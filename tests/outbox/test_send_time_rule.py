"""SPEC 10.4 at send time, with bare workers on real PostgreSQL: the worker connects only to
addresses it judged, resolving each name once, and TLS still checks the name.

Rows are written by SQL, as if saved before the rule existed or around it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.outbox.names import Names
from tests.outbox.recorder import RECORDER_NETWORKS, NtfyRecorder
from tests.outbox.support import add_pushes, add_user, config, wait_settled
from tests.support import Sql
from umbra_grpc.destinations import Destinations
from umbra_grpc.outbox import ntfy
from umbra_grpc.outbox.worker import OutboxWorker
from umbra_grpc.peer import parse_networks
from umbra_grpc.storage.database import Database

pytestmark = pytest.mark.asyncio(loop_scope="session")
PUBLIC = "93.184.216.34"


@contextlib.asynccontextmanager
async def delivering(
    db: Database,
    database_url: str,
    destinations: Destinations,
    client: httpx.AsyncClient | None = None,
) -> AsyncIterator[OutboxWorker]:
    """A started worker sending where `destinations` allows, one attempt per row."""
    worker = OutboxWorker(
        db,
        config(database_url, outbox_max_attempts=1),
        destinations=destinations,
        client=client,
    )
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


async def test_sends_to_forbidden_destinations_are_dead_lettered_with_their_reason(
    database_url: str, db: Database, recorder: NtfyRecorder, sql: Sql
) -> None:
    names = Names({"mixed.test": [[PUBLIC, "127.0.0.1"]]})
    urls = {
        recorder.url: "loopback address (127.0.0.1)",
        f"http://[::ffff:127.0.0.1]:{recorder.port}": "loopback address (127.0.0.1)",
        f"http://2130706433:{recorder.port}": "loopback address (127.0.0.1)",
        f"http://localhost:{recorder.port}": "names a localhost address",
        f"http://mixed.test:{recorder.port}": "loopback address (127.0.0.1)",
        f"http://user:password@{PUBLIC}": "must not hold a user name or password",
    }
    users = {await add_user(sql, recorder, ntfy_server_url=url): url for url in urls}
    for user in users:
        await add_pushes(sql, user)
    async with delivering(db, database_url, Destinations(resolver=names)) as worker:
        worker.wake()
        await wait_settled(sql)
    for user, url in users.items():
        [row] = await sql.rows("SELECT * FROM outbox WHERE user_id = $1", user)
        assert (row["status"], row["attempts"]) == ("failed", 1), url
        assert row["last_error"].startswith("destination refused: ntfy server URL"), url
        assert urls[url] in row["last_error"], url
        assert recorder.for_topic(f"t{user}") == [], url


async def test_the_connection_goes_to_the_judged_address_under_the_name(
    database_url: str, db: Database, recorder: NtfyRecorder, sql: Sql
) -> None:
    # Only this resolver knows the name: the push can only arrive if the connection was
    # made to the address the check saw, not to a second lookup of the name.
    names = Names({"ntfy.test": [["127.0.0.1"], ["10.0.0.1"]]})
    destinations = Destinations(parse_networks(RECORDER_NETWORKS), names)
    user = await add_user(sql, recorder, ntfy_server_url=f"http://ntfy.test:{recorder.port}")
    await add_pushes(sql, user)
    async with delivering(db, database_url, destinations) as worker:
        worker.wake()
        [received] = await recorder.wait_for(f"t{user}", 1)
        await wait_settled(sql)
    assert received.headers["host"] == f"ntfy.test:{recorder.port}"
    assert names.lookups["ntfy.test"] == 1
    assert await sql.value("SELECT status FROM outbox WHERE user_id = $1", user) == "sent"


def tls_for(name: str, folder: Path) -> tuple[ssl.SSLContext, ssl.SSLContext, list[str]]:
    """A server context with a certificate for `name` from a fresh CA, a client context
    trusting that CA, and the list the server appends each client's SNI name to."""
    now = dt.datetime.now(dt.UTC)

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "umbra test CA")])
    ca = (
        certificate("umbra test CA", ca_key, ca_name)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        certificate(name, key, ca_name)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "leaf.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(folder / "leaf.pem", folder / "leaf.key")
    seen: list[str] = []
    server.sni_callback = lambda _socket, server_name, _context: seen.append(server_name)
    client = ssl.create_default_context(cafile=folder / "ca.pem")
    return server, client, seen


async def test_tls_checks_the_certificate_for_the_name_not_the_address(
    database_url: str, db: Database, sql: Sql, tmp_path: Path
) -> None:
    server_tls, client_tls, sni_names = tls_for("ntfy.test", tmp_path)
    secure = NtfyRecorder(tls=server_tls)
    await secure.start()
    names = Names({"ntfy.test": [["127.0.0.1"]], "impostor.test": [["127.0.0.1"]]})
    destinations = Destinations(parse_networks(RECORDER_NETWORKS), names)
    client = ntfy.new_client(config(database_url), destinations, verify=client_tls)
    right = await add_user(sql, secure, ntfy_server_url=f"https://ntfy.test:{secure.port}")
    wrong = await add_user(sql, secure, ntfy_server_url=f"https://impostor.test:{secure.port}")
    for user in (right, wrong):
        await add_pushes(sql, user)
    try:
        async with delivering(db, database_url, destinations, client) as worker:
            worker.wake()
            await wait_settled(sql)
    finally:
        await client.aclose()
        await secure.stop()
    assert await sql.value("SELECT status FROM outbox WHERE user_id = $1", right) == "sent"
    assert [r.headers["host"] for r in secure.for_topic(f"t{right}")] == [
        f"ntfy.test:{secure.port}"
    ]
    # Same address, another name: the certificate does not fit, nothing is sent.
    [row] = await sql.rows("SELECT * FROM outbox WHERE user_id = $1", wrong)
    assert row["status"] == "failed"
    assert "CERTIFICATE_VERIFY_FAILED" in row["last_error"]
    assert secure.for_topic(f"t{wrong}") == []
    assert set(sni_names) == {"ntfy.test", "impostor.test"}
