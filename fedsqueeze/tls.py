"""TLS and mutual TLS for both sides: PEM files in, gRPC credentials out.

Aggregator: `--tls-cert`, `--tls-key` serve TLS; adding `--tls-ca` requires every client to present
a certificate signed by that CA (mTLS), and the certificate's common name is then the
collaborator's identity (checked by the servicer on every RPC). Collaborator: `--tls-ca` verifies
the aggregator; `--tls-cert`, `--tls-key` present the client certificate for mTLS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


class TLSConfigError(ValueError):
    """A TLS option is missing its partner or a file cannot be read."""


def _read(path: str | Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc


@dataclass(frozen=True)
class ServerTLS:
    cert: bytes
    key: bytes
    ca: bytes | None = None  # set: mutual TLS, client certificates required and verified

    @classmethod
    def from_files(
        cls, cert: str | Path | None, key: str | Path | None, ca: str | Path | None = None
    ) -> ServerTLS | None:
        if cert is None and key is None and ca is None:
            return None
        if cert is None or key is None:
            raise TLSConfigError("TLS needs both --tls-cert and --tls-key (and --tls-ca for mutual TLS)")
        c, k = _read(cert, "certificate"), _read(key, "private key")
        assert c is not None and k is not None
        return cls(c, k, _read(ca, "CA certificate"))

    @property
    def mutual(self) -> bool:
        return self.ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )


@dataclass(frozen=True)
class ClientTLS:
    ca: bytes | None = None  # None: the system's roots
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None  # override the name checked against the aggregator's certificate

    @classmethod
    def from_files(
        cls,
        ca: str | Path | None,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        server_name: str | None = None,
    ) -> ClientTLS | None:
        if ca is None and cert is None and key is None:
            return None
        if (cert is None) != (key is None):
            raise TLSConfigError("a client certificate needs both --tls-cert and --tls-key")
        return cls(
            _read(ca, "CA certificate"), _read(cert, "certificate"), _read(key, "private key"), server_name
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []
