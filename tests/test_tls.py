"""Transport security: TLS, mutual TLS with the certificate's CN as identity, tokens on every RPC."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedsqueeze.aggregator.server import AggregatorServer
from fedsqueeze.collaborator.transport import FederationClient
from fedsqueeze.errors import PermissionDenied, Unauthenticated, Unreachable
from fedsqueeze.plan import Plan
from fedsqueeze.tls import ClientTLS, ServerTLS
from fedsqueeze.v1 import fedsqueeze_pb2 as pb
from fedsqueeze.v1 import fedsqueeze_pb2_grpc as pb_grpc


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(name: str):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def issue(ca, cn: str, server: bool = False) -> tuple[bytes, bytes]:
    ca_key, ca_cert = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
    )  # fmt: skip
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki():
    ca, other = make_ca("fedsqueeze test CA"), make_ca("someone else's CA")
    return {
        "ca": pem(ca[1]),
        "server": issue(ca, "aggregator", server=True),
        "alice": issue(ca, "alice"),
        "bob": issue(ca, "bob"),
        "mallory": issue(other, "alice"),  # the right name, from the wrong CA
    }


@pytest.fixture
def mtls_server(pki):
    cert, key = pki["server"]
    plan = Plan.from_json({"rounds": 1, "collaborators": {"min": 2}, "round_timeout_s": 30})
    srv = AggregatorServer(plan, host="127.0.0.1", port=0, tls=ServerTLS(cert, key, pki["ca"])).start()
    yield srv
    srv.stop(grace=0.1)


def client(srv, pki, who: str | None, timeout: float = 2.0) -> FederationClient:
    cert, key = pki[who] if who else (None, None)
    return FederationClient(
        f"localhost:{srv.port}", connect_timeout=timeout, tls=ClientTLS(pki["ca"], cert, key)
    )


def test_mtls_identity_is_the_common_name(mtls_server, pki) -> None:
    alice = client(mtls_server, pki, "alice")
    session = alice.join("laptop")
    assert session.collaborator_id == "alice"
    assert alice.get_task(0.1).kind == "WAIT"
    # Alice's certificate cannot act as bob, even with bob's own token.
    bob = client(mtls_server, pki, "bob")
    bob_session = bob.join("bob")
    assert bob_session.collaborator_id == "bob"
    alice.session.collaborator_id, alice.session.token = "bob", bob_session.token  # type: ignore[union-attr]
    with pytest.raises(PermissionDenied):
        alice.get_task(0.1)
    # Joining again under the same certificate re-issues the token: the old one stops working.
    again = client(mtls_server, pki, "alice").join("laptop")
    assert again.collaborator_id == "alice" and again.token != session.token
    alice.session.collaborator_id, alice.session.token = "alice", session.token  # type: ignore[union-attr]
    with pytest.raises(Unauthenticated):
        alice.get_task(0.1)
    for c in (alice, bob):
        c.close()


def test_certificate_from_another_ca_or_none_is_refused(mtls_server, pki) -> None:
    for who in ("mallory", None):
        c = client(mtls_server, pki, who, timeout=1.0)
        with pytest.raises(Unreachable):  # the TLS handshake fails: no RPC reaches the servicer
            c.join("intruder")
        c.close()
    assert not mtls_server.federation.membership.members
    # Plaintext to a TLS port is refused too.
    channel = grpc.insecure_channel(f"127.0.0.1:{mtls_server.port}")
    with pytest.raises(grpc.RpcError) as info:
        pb_grpc.FederationStub(channel).Join(pb.JoinRequest(name="x"), timeout=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    channel.close()


def test_server_only_tls_still_checks_tokens(pki) -> None:
    cert, key = pki["server"]
    plan = Plan.from_json({"rounds": 1, "collaborators": {"min": 2}, "round_timeout_s": 30})
    srv = AggregatorServer(plan, host="127.0.0.1", port=0, tls=ServerTLS(cert, key)).start()
    try:
        c = FederationClient(f"localhost:{srv.port}", connect_timeout=2, tls=ClientTLS(pki["ca"]))
        s = c.join("x")
        assert s.collaborator_id.startswith("c0000-")
        for cid, token in [(s.collaborator_id, "forged"), (s.collaborator_id, ""), ("c0001-000000", s.token)]:
            c.session.collaborator_id, c.session.token = cid, token  # type: ignore[union-attr]
            with pytest.raises(Unauthenticated):
                c.get_task(0.1)
        c.close()
    finally:
        srv.stop(grace=0.1)
