"""`kvstore certs init`: a development certificate authority and the certificates of a cluster.

Made with the `cryptography` package (X.509 building and signing is not ours to write; the
ssl module that serves TLS cannot make certificates). For development, tests and local
clusters: production certificates come from the organisation's CA or cert-manager
(deploy/README.md).

What `init_pki(directory, ...)` writes (keys 0600, the rest 0644), EC P-256 throughout:
- `ca.pem`, `ca-key.pem`: the CA (reused when both files already exist, so running init again
  with more nodes or clients adds certificates signed by the same CA);
- `node<N>.pem`, `node<N>-key.pem` for N = 1..nodes: server and client use (one certificate
  for both ports), SANs `urn:kvstore:node:<N>` (the member identity kvstore/server/tls.py
  checks), `localhost`, 127.0.0.1, ::1 and every `--host` given;
- `client-<name>.pem`, `client-<name>-key.pem` for each client name: client use only, the name
  as the subject's common name (the user a client certificate authenticates as).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvstore.server.tls import NODE_URI_PREFIX

_KEY_MODE = 0o600
_CERT_MODE = 0o644


def _write(path: Path, data: bytes, mode: int) -> None:
    temporary = path.with_name(path.name + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write(path, pem, _KEY_MODE)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvstore development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: object, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _load_or_make_ca(
    directory: Path, days: int
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{key_path}: not an EC key made by kvstore certs init")
        return certificate, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("kvstore development CA")
    certificate = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write(cert_path, certificate.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
    return certificate, key


def _alt_names(node_id: int | None, hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    if node_id is not None:
        names.append(x509.UniformResourceIdentifier(f"{NODE_URI_PREFIX}{node_id}"))
    for host in ("localhost", "127.0.0.1", "::1", *hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _issue(
    directory: Path,
    stem: str,
    common_name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    alt_names: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    days: int,
) -> Path:
    ca_certificate, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca_certificate.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    _write_key(directory / f"{stem}-key.pem", key)
    path = directory / f"{stem}.pem"
    _write(path, certificate.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
    return path


def init_pki(
    directory: Path,
    *,
    nodes: int = 3,
    hosts: Sequence[str] = (),
    clients: Sequence[str] = ("admin",),
    days: int = 365,
) -> list[Path]:
    """Write the CA (or reuse it), node and client certificates; the paths of the certificates."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _load_or_make_ca(directory, days)
    written = [directory / "ca.pem"]
    both = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    for node_id in range(1, nodes + 1):
        written.append(
            _issue(
                directory,
                f"node{node_id}",
                f"kvstore node {node_id}",
                ca,
                alt_names=_alt_names(node_id, hosts),
                usages=both,
                days=days,
            )
        )
    for name in clients:
        written.append(
            _issue(
                directory,
                f"client-{name}",
                name,
                ca,
                alt_names=[],
                usages=[ExtendedKeyUsageOID.CLIENT_AUTH],
                days=days,
            )
        )
    return written


def node_tls_args(directory: Path, node_id: int) -> list[str]:
    """`kvstore serve` flags for TLS on both ports with init_pki's files of node `node_id`."""
    cert = str(directory / f"node{node_id}.pem")
    key = str(directory / f"node{node_id}-key.pem")
    ca = str(directory / "ca.pem")
    return [
        "--cert-file", cert, "--key-file", key, "--ca-file", ca,
        "--client-cert-auth", "optional",
        "--peer-cert-file", cert, "--peer-key-file", key, "--peer-ca-file", ca,
    ]  # fmt: skip
