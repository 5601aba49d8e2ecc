"""TLS for the Gateway link: the node's certificate, its fingerprint, and the server context.

How it works:

* With ``listen.cert_file`` and ``listen.cert_key_file`` set, those PEM files are used as they are
  (both or neither; a certificate that does not match its key is a ConfigError).
* Otherwise the node keeps its own under ``<state_dir>/tls/`` (directory 0700): ``cert.pem`` and
  ``key.pem``, generated on first start and kept from then on, because Gateways pin the
  certificate by its fingerprint and a new one would lock them all out. The key is EC P-256; the
  certificate is self-signed, CN = node id, SubjectAltName = localhost, 127.0.0.1, ::1 and the
  host name, valid for 10 years (from an hour ago, to tolerate clock skew). Both files are written
  through ``keys.write_private`` (created 0600, never chmodded afterwards).
* ``fingerprint`` is ``sha256:`` and the SHA-256 of the certificate's DER bytes as colon-separated
  upper-case hex pairs, the form ``openssl x509 -fingerprint -sha256`` prints (formatted by
  ``optimanode.link.fingerprint_der``, the one copy both ends use). Gateways pin it (system CAs are
  never consulted); ``optimanode fingerprint`` prints it for the operator.
* ``server_context`` is a server-side ``ssl.SSLContext`` with TLS 1.2 as the minimum version.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import secrets
import socket
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from optimanode.config import Settings
from optimanode.errors import ConfigError
from optimanode.gateway.keys import write_private
from optimanode.link import fingerprint_der

log = logging.getLogger(__name__)

VALIDITY = datetime.timedelta(days=3650)


def default_paths(settings: Settings) -> tuple[Path, Path]:
    d = settings.state_path / "tls"
    return d / "cert.pem", d / "key.pem"


def cert_paths(settings: Settings) -> tuple[Path, Path]:
    """(certificate, private key) the node serves with, from the settings or the default location."""
    cert, key = settings.listen.cert_file, settings.listen.cert_key_file
    if bool(cert) != bool(key):
        raise ConfigError("settings", "listen.cert_file" if key else "listen.cert_key_file",
                          "listen.cert_file and listen.cert_key_file both set, or both empty")
    if cert:
        return Path(cert).expanduser(), Path(key).expanduser()
    return default_paths(settings)


def generate_self_signed(node_id: str, hostnames: list[str] | None = None) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for a new EC P-256 self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    # X.509 limits a common name to 64 characters.
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (node_id or "optimanode")[:64]),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OptimaNode")])
    if hostnames is None:
        hostnames = [socket.gethostname()]
    dns = list(dict.fromkeys(["localhost", *[h for h in hostnames if h]]))
    san: list[x509.GeneralName] = [x509.DNSName(h) for h in dns]
    san += [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert_pem, key_pem


def ensure_certificate(settings: Settings, node_id: str) -> tuple[Path, Path]:
    """The certificate and key to serve with; generated under <state_dir>/tls/ when there are none."""
    cert, key = cert_paths(settings)
    if settings.listen.cert_file:
        for path, what in ((cert, "listen.cert_file"), (key, "listen.cert_key_file")):
            if not path.is_file():
                raise ConfigError("settings", what, f"an existing PEM file, not {path}")
        return cert, key
    if cert.exists() and key.exists():
        return cert, key
    if cert.exists() or key.exists():
        # Half a pair cannot be served; the missing half never was, so nothing pinned it.
        log.warning("only one of %s and %s exists; generating a new certificate", cert, key)
    cert.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_pem, key_pem = generate_self_signed(node_id)
    write_private(key, key_pem)
    write_private(cert, cert_pem)  # last: a certificate on disk always has its key beside it
    log.warning("generated a self-signed TLS certificate %s; Gateways pin its fingerprint %s", cert,
                fingerprint(cert_pem))
    return cert, key


def fingerprint(cert_pem: bytes | str) -> str:
    """``sha256:AB:CD:...`` of the certificate's DER encoding."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    cert = x509.load_pem_x509_certificate(data)
    return fingerprint_der(cert.public_bytes(serialization.Encoding.DER))


def fingerprint_file(path: str | Path) -> str:
    return fingerprint(Path(path).read_bytes())


TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context: TLS 1.2 minimum, the node's certificate and key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: forward-secret AEAD suites only (no CBC: scanners rate it obsolete, LUCKY13).
    # TLS 1.3's suites are all AEAD and are not governed by set_ciphers.
    ctx.set_ciphers(TLS12_CIPHERS)
    mode = key.stat().st_mode & 0o777
    if mode & 0o077:
        # Not refused: an operator's own key may be group-readable on purpose (e.g. an ssl-cert group).
        log.warning("TLS private key %s is readable by group or others (mode %s)", key, oct(mode))
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(str(cert), "certificate", f"a PEM certificate matching the key {key} ({exc})") from None
    return ctx
