"""Test PKI and mosquitto auth files made on the fly: a CA, server and client certificates, a password
file and an ACL file, so the security tests run against a real TLS broker without checked-in secrets.

The `cryptography` package is not installed in the venv (and must not be added), so certificates are
made with the `openssl` binary; EC P-256 keys keep generation to a few tens of milliseconds each.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


def _openssl(*args: str | Path) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise RuntimeError("the openssl binary is needed to make test certificates")
    subprocess.run([binary, *map(str, args)], check=True, capture_output=True, timeout=30)


@dataclass(frozen=True)
class CertKey:
    """A PEM certificate and its unencrypted PEM private key."""

    cert: Path
    key: Path


def make_ca(directory: Path, name: str) -> CertKey:
    """A self-signed CA allowed to sign certificates (and nothing else), valid for two days."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertKey(directory / f"{name}.crt", directory / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca.key, "-out", ca.cert, "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    return ca


def issue(ca: CertKey, directory: Path, name: str, *, server: bool) -> CertKey:
    """A leaf certificate signed by `ca`: a server one for 127.0.0.1 and localhost, or a client one."""
    leaf = CertKey(directory / f"{name}.crt", directory / f"{name}.key")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    cn = "127.0.0.1" if server else name
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", leaf.key, "-out", csr, "-subj", f"/CN={cn}",
    )  # fmt: skip
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid,issuer",
        "extendedKeyUsage=serverAuth" if server else "extendedKeyUsage=clientAuth",
    ]
    if server:
        lines.append("subjectAltName=IP:127.0.0.1,DNS:localhost")
    ext.write_text("\n".join(lines) + "\n")
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert, "-CAkey", ca.key, "-CAcreateserial",
        "-days", "2", "-sha256", "-extfile", ext, "-out", leaf.cert,
    )  # fmt: skip
    leaf.key.chmod(0o600)
    return leaf


@dataclass(frozen=True)
class Pki:
    """Everything a TLS test needs: the broker's CA and certificate, a client certificate signed by the
    same CA, and an unrelated CA (the 'wrong CA') with its own client certificate."""

    ca: CertKey
    server: CertKey
    client: CertKey
    other_ca: CertKey
    other_client: CertKey


def make_pki(directory: Path) -> Pki:
    ca = make_ca(directory, "edgewatch-test-ca")
    other = make_ca(directory, "unrelated-ca")
    return Pki(
        ca=ca,
        server=issue(ca, directory, "broker", server=True),
        client=issue(ca, directory, "gw-01", server=False),
        other_ca=other,
        other_client=issue(other, directory, "intruder", server=False),
    )


def make_password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file (hashed, `user:$7$...`) made with the real mosquitto_passwd."""
    binary = shutil.which("mosquitto_passwd")
    if binary is None:
        raise RuntimeError("mosquitto_passwd is needed to make the broker's password file")
    path.write_text("")
    for user, password in users.items():
        subprocess.run([binary, "-b", str(path), user, password], check=True, capture_output=True, timeout=30)
    return path
