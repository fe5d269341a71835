"""Who may talk to the controller: TLS (mutual with a CA) on the gRPC port, and per-job tokens.

Transport. ``ServerSecurity(tls_cert, tls_key, tls_ca)`` gives the server credentials: TLS with
the cert and key; with ``tls_ca`` too, mutual TLS (a client must present a certificate that CA
signed, or the handshake fails). Without TLS the controller listens only on a loopback
address, unless ``insecure`` says plaintext on the network is meant (a warning is logged):
``check_listen`` refuses before anything binds.

Tokens. ``TokenTable.load(path)`` reads a tokens file, one ``JOB_ID TOKEN`` per line (``*
TOKEN`` for an operator credential; blank lines and ``#`` comments are skipped). Only the
SHA-256 of each token is kept, and a presented token is compared (``hmac.compare_digest``)
with every entry, so the time taken says nothing about which one matched. A caller sends its
token as gRPC metadata, ``authorization: Bearer TOKEN`` (or ``adaptrun-token: TOKEN``).

What a token opens (``Principal``): a job token, its job: register agents for it, stream its
reports, watch its directives, see it in ``ListJobs``. The operator credential: every job, and
``SetBounds`` (``adaptrun scale``), which a job token may not call even for its own job: the
bounds are the cluster operator's limit on what a job may take, not the job's to raise.
Without a tokens file (``tokens=None``) every caller may do everything, as before: meant for
loopback and tests only.

Health and reflection stay open (no token): they say only whether the server is up and what
its services look like.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

__all__ = ["AuthError", "TokenTable", "Principal", "ServerSecurity", "is_loopback",
           "token_from_metadata", "TOKEN_METADATA", "OPERATOR"]

log = logging.getLogger("adaptrun.controller")

TOKEN_METADATA = "adaptrun-token"
OPERATOR = "*"


class AuthError(ValueError):
    """Bad security settings (a missing file, a malformed tokens file); the message says which."""


def is_loopback(host: str) -> bool:
    """True for a host name or address that only this machine reaches."""
    h = host.strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Principal:
    """What a caller's token opens."""
    operator: bool = False
    jobs: frozenset[str] = frozenset()

    def may_see(self, job_id: str) -> bool:
        return self.operator or job_id in self.jobs


ANYONE = Principal(operator=True)   # no tokens configured: the loopback/test default


@dataclass(frozen=True)
class TokenTable:
    entries: tuple[tuple[str, bytes], ...]        # (job id or '*', sha256 of its token)

    @classmethod
    def load(cls, path: str | Path) -> "TokenTable":
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise AuthError(f"cannot read the tokens file {path}: {exc.strerror}") from None
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                # Never echo the line: it holds a token.
                raise AuthError(f"{path} line {n}: expected 'JOB_ID TOKEN' or '* TOKEN'")
            job_id, token = parts
            if len(token) < 16:
                raise AuthError(f"{path} line {n}: a token must be at least 16 characters")
            entries.append((job_id, _digest(token)))
        if not entries:
            raise AuthError(f"the tokens file {path} holds no token")
        return cls(tuple(entries))

    def principal(self, token: str | None) -> Principal | None:
        """What ``token`` opens, or None when it opens nothing (missing or unknown)."""
        if not token:
            return None
        d = _digest(token)
        operator, jobs = False, set()
        for job_id, want in self.entries:          # no early exit: constant work per call
            if hmac.compare_digest(d, want):
                if job_id == OPERATOR:
                    operator = True
                else:
                    jobs.add(job_id)
        if not operator and not jobs:
            return None
        return Principal(operator=operator, jobs=frozenset(jobs))


def token_from_metadata(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, rest = value.partition(" ")
            if scheme.lower() == "bearer" and rest.strip():
                return rest.strip()
        elif key == TOKEN_METADATA and isinstance(value, str) and value:
            return value
    return None


@dataclass(frozen=True)
class ServerSecurity:
    """The controller's transport and caller checks (see the module docstring)."""
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None           # given: mutual TLS (clients need a cert it signed)
    tokens: TokenTable | None = field(default=None, repr=False)
    insecure: bool = False              # plaintext on a non-loopback address, knowingly

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def validate(self) -> "ServerSecurity":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise AuthError("--tls-cert and --tls-key go together: give both")
        if self.tls_ca and not self.tls_cert:
            raise AuthError("--tls-ca (mutual TLS) needs the server's own --tls-cert and "
                            "--tls-key")
        if self.insecure and self.tls:
            raise AuthError("--insecure and --tls-* exclude each other")
        return self

    def check_listen(self, host: str, port: int) -> None:
        """Refuse plaintext on an address other machines reach, unless ``insecure``."""
        if self.tls or is_loopback(host):
            return
        if not self.insecure:
            raise AuthError(f"refusing to listen on {host}:{port} in plaintext: give "
                            f"--tls-cert/--tls-key (and --tls-ca for mutual TLS), or --insecure")
        log.warning("listening on %s:%d WITHOUT TLS (--insecure): anyone on the network can "
                    "read and forge the control plane%s", host, port,
                    "" if self.tokens else ", and no tokens file is set")

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None

        def read(path, what):
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise AuthError(f"cannot read {what} {path}: {exc.strerror}") from None
        ca = read(self.tls_ca, "--tls-ca") if self.tls_ca else None
        return grpc.ssl_server_credentials(
            [(read(self.tls_key, "--tls-key"), read(self.tls_cert, "--tls-cert"))],
            root_certificates=ca, require_client_auth=ca is not None)

    def principal(self, metadata) -> Principal | None:
        """What the caller may do; None: nothing (no valid token while tokens are set)."""
        if self.tokens is None:
            return ANYONE
        return self.tokens.principal(token_from_metadata(metadata))


PLAINTEXT = ServerSecurity()


# -- a test PKI (`adaptrun certs`) --------------------------------------------------------

def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to a new mode-0600 file (replacing any old one)."""
    import os
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_test_pki(directory: str | Path, hosts: list[str], days: int = 365) -> list[Path]:
    """A CA, a server certificate valid for ``hosts`` (DNS names or IP addresses) and a
    client certificate, each with its key (EC P-256; keys 0600), in ``directory``. For a
    test deployment: a real one takes its certificates from its own CA (cert-manager...)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "adaptrun"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key):
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("adaptrun test CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn, usage, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(start).not_valid_after(end)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                 ca_key.public_key()), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    sans = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server, server_key = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client, client_key = leaf("adaptrun-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    written = []
    for stem, cert, key in (("ca", ca, ca_key), ("server", server, server_key),
                            ("client", client, client_key)):
        crt = out / f"{stem}.crt"
        crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(out / f"{stem}.key", key_pem(key))
        written += [crt, out / f"{stem}.key"]
    return written
