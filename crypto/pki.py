"""The deployment's public-key infrastructure: a CA, the SuperLink's TLS certificate, and
the SuperNodes' authentication key pairs. Everything is made and checked with the
``cryptography`` package; nothing of X.509 is written by hand.

- :func:`make_ca`: a self-signed CA (ECDSA P-384, ``BasicConstraints(ca=True,
  path_length=0)``, key usage ``keyCertSign``/``cRLSign``), which signs only the
  SuperLink's certificate. It is the root every SuperNode trusts (``--root-certificates``).
- :func:`issue_server_cert`: the SuperLink's certificate for the coordinator's host
  names and addresses (subject alternative names; ``serverAuth``).
- :func:`make_node_key`: a SuperNode's authentication key pair in the format Flower's
  node authentication reads: an EC key on a NIST curve (P-384), the private key in
  OpenSSH's PEM format (``--auth-supernode-private-key``), the public key as one
  OpenSSH line (``flwr supernode register``).
- :func:`check_server_cert`, :func:`check_ca`, :func:`check_node_key`: what a node checks
  before it connects: signed by this CA, in its validity period, for this host, the key
  pair one. Each failure raises :class:`PKIError` naming the file and what to do.

Private keys are written with :func:`crypto.keyfile.write_private` (0600, folder 0700,
no link followed) and read back with :func:`crypto.keyfile.read_private` (refused when
others can read them).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from crypto.keyfile import KeyFileError, read_private, write_private

__all__ = ["PKIError", "CertInfo", "make_ca", "issue_server_cert", "make_node_key",
           "load_cert", "cert_info", "check_ca", "check_server_cert", "check_node_key",
           "public_key_fingerprint", "node_public_key"]

CURVE = ec.SECP384R1  # a NIST curve, as Flower's node authentication requires


class PKIError(KeyFileError):
    """A certificate or key that is missing, malformed, expired, or not of this CA."""


@dataclass(frozen=True)
class CertInfo:
    """The public facts of a certificate, for ``fedface deploy show``."""

    subject: str
    issuer: str
    fingerprint: str  # SHA-256 of the DER, colon-separated hex pairs (first 16 bytes)
    not_before: dt.datetime
    not_after: dt.datetime
    names: tuple[str, ...]  # subject alternative names

    def days_left(self, now: dt.datetime | None = None) -> float:
        now = now or dt.datetime.now(dt.UTC)
        return (self.not_after - now).total_seconds() / 86400.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey, fmt=serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _colon(hexd: str) -> str:
    return ":".join(hexd[i:i + 2] for i in range(0, len(hexd), 2))


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A KeyUsage extension allowing only ``allowed`` (the rest False)."""
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{n: bool(allowed.get(n, False)) for n in names})


def _save(cert: x509.Certificate, key, cert_path: Path, key_path: Path) -> x509.Certificate:
    write_private(key_path, _pem_key(key))
    Path(cert_path).write_bytes(_cert_pem(cert))
    return cert


def make_ca(cert_path: Path, key_path: Path, name: str, days: int) -> x509.Certificate:
    """A new self-signed CA: its certificate to ``cert_path``, its key (0600) to ``key_path``."""
    key = ec.generate_private_key(CURVE())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedface deployment"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    return _save(cert, key, cert_path, key_path)


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_cert(ca_cert_path: Path, ca_key_path: Path, cert_path: Path, key_path: Path,
                      hosts: list[str], days: int) -> x509.Certificate:
    """The SuperLink's TLS certificate for ``hosts`` (names and addresses), signed by the CA."""
    if not hosts:
        raise PKIError("the SuperLink certificate needs at least one host name or address "
                       "(--coordinator HOST)")
    ca_cert = load_cert(ca_cert_path, "CA certificate")
    ca_key = _load_pem_private(ca_key_path, "CA private key")
    key = ec.generate_private_key(CURVE())
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, key_agreement=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    return _save(cert, key, cert_path, key_path)


def make_node_key(private_path: Path, public_path: Path) -> str:
    """A SuperNode's authentication key pair; returns the public key's fingerprint."""
    key = ec.generate_private_key(CURVE())
    write_private(private_path, _pem_key(key, serialization.PrivateFormat.OpenSSH))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    Path(public_path).write_bytes(public + b"\n")
    return public_key_fingerprint(key.public_key())


def public_key_fingerprint(public_key) -> str:
    """SHA-256 of the public key's SubjectPublicKeyInfo, as ``SHA256:`` and 16 hex pairs."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + _colon(hashlib.sha256(der).hexdigest()[:32])


def node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """A SuperNode's public key file (one OpenSSH line, EC on a NIST curve)."""
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"node public key {path} is missing: re-provision with `fedface deploy "
                       "init`, or copy it from the site's node/ folder") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise PKIError(f"node public key {path} is not an OpenSSH public key ({err}): copy the "
                       "node/auth.pub that `fedface deploy init` wrote") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise PKIError(f"node public key {path} is a {type(key).__name__}, not an EC key on a "
                       "NIST curve (Flower's node authentication needs one)")
    return key


def _load_pem_private(path: Path, what: str):
    raw = read_private(path, what, PKIError)
    try:
        return serialization.load_pem_private_key(raw, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise PKIError(f"{what} {path} is not an unencrypted PEM private key ({err})") from None


def load_cert(path: Path, what: str = "certificate") -> x509.Certificate:
    """A PEM certificate; a missing or malformed file is a :class:`PKIError`."""
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PKIError(f"{what} {path} is missing: copy it from the folder `fedface deploy "
                       "init` wrote") from None
    except ValueError as err:
        raise PKIError(f"{what} {path} is not a PEM certificate ({err})") from None


def cert_fingerprint(cert: x509.Certificate) -> str:
    return _colon(cert.fingerprint(hashes.SHA256()).hex()[:32])


def cert_info(cert: x509.Certificate) -> CertInfo:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple([str(n) for n in san.get_values_for_type(x509.DNSName)]
                      + [str(a) for a in san.get_values_for_type(x509.IPAddress)])
    except x509.ExtensionNotFound:
        names = ()
    return CertInfo(subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
                    fingerprint=cert_fingerprint(cert), not_before=cert.not_valid_before_utc,
                    not_after=cert.not_valid_after_utc, names=names)


def _check_dates(cert: x509.Certificate, path: Path, what: str, now: dt.datetime) -> None:
    start, end = (f"{t:%Y-%m-%d %H:%M} UTC" for t in (cert.not_valid_before_utc,
                                                       cert.not_valid_after_utc))
    if now < cert.not_valid_before_utc:
        raise PKIError(f"{what} {path} is not valid before {start}: check this machine's clock")
    if now > cert.not_valid_after_utc:
        raise PKIError(f"{what} {path} expired on {end}: "
                       "issue new certificates with `fedface deploy init --force` and hand the "
                       "folders out again")


def check_ca(path: Path, fingerprint: str | None = None, now: dt.datetime | None = None
             ) -> x509.Certificate:
    """The CA certificate at ``path``: a CA, in date, and (given) of ``fingerprint``."""
    path = Path(path)
    cert = load_cert(path, "CA certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise PKIError(f"CA certificate {path} is not a CA certificate: use the tls/ca.crt "
                       "that `fedface deploy init` wrote")
    if fingerprint and cert_fingerprint(cert) != fingerprint:
        raise PKIError(f"CA certificate {path} (fingerprint {cert_fingerprint(cert)}) is not "
                       f"this deployment's CA ({fingerprint}, in deployment.json): copy tls/ca.crt "
                       "from the same `fedface deploy init` as this folder")
    _check_dates(cert, path, "CA certificate", now or _now())
    return cert


def _canonical_name(host: str) -> str:
    """An IP address in its canonical form, a DNS name lower-cased (how they compare)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def _check_server_usage(cert: x509.Certificate, path: Path) -> None:
    """Refuse a CA certificate, or one whose extended key usage lacks ``serverAuth``."""
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if is_ca:
        raise PKIError(f"SuperLink certificate {path} is a CA certificate (BasicConstraints "
                       "ca=True), not a server's: use the tls/server.crt that `fedface deploy "
                       "init` wrote")
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if ExtendedKeyUsageOID.SERVER_AUTH not in eku:
        raise PKIError(f"SuperLink certificate {path} is not for a TLS server (its extended key "
                       "usage lacks serverAuth): use the tls/server.crt that `fedface deploy "
                       "init` wrote")


def check_server_cert(cert_path: Path, key_path: Path, ca_path: Path,
                      hosts: list[str] | None = None, now: dt.datetime | None = None
                      ) -> x509.Certificate:
    """The SuperLink's certificate: signed by the CA, a server's certificate (not a CA's;
    ``serverAuth`` if it has an extended key usage), in date, for ``hosts``, and the
    certificate of the private key at ``key_path`` (which must be owner-only)."""
    now = now or _now()
    cert_path, key_path, ca_path = Path(cert_path), Path(key_path), Path(ca_path)
    ca = check_ca(ca_path, now=now)
    cert = load_cert(cert_path, "SuperLink certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise PKIError(f"SuperLink certificate {cert_path} is not signed by the CA {ca_path} "
                       f"(issuer {cert.issuer.rfc4514_string()}): the two come from different "
                       "provisionings; copy both from one `fedface deploy init`") from None
    _check_server_usage(cert, cert_path)
    _check_dates(cert, cert_path, "SuperLink certificate", now)
    key = _load_pem_private(key_path, "SuperLink TLS key")
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, pub)
            != cert.public_key().public_bytes(serialization.Encoding.DER, pub)):
        raise PKIError(f"SuperLink TLS key {key_path} is not the key of certificate {cert_path}: "
                       "copy both from one `fedface deploy init`")
    if hosts:
        names = set(cert_info(cert).names)
        canonical = {_canonical_name(n) for n in names}
        missing = [h for h in hosts if _canonical_name(h) not in canonical]
        if missing:
            raise PKIError(f"SuperLink certificate {cert_path} is for {sorted(names)}, not for "
                           f"{missing}: re-provision with `fedface deploy init --coordinator "
                           f"{','.join(hosts)} --force`")
    return cert


def check_node_key(private_path: Path, public_path: Path | None = None) -> str:
    """A SuperNode's authentication key: owner-only, EC on a NIST curve, and (given) the
    private key of ``public_path``. Returns the public key's fingerprint."""
    private_path = Path(private_path)
    raw = read_private(private_path, "node authentication key", PKIError,
                       missing="copy the site's node/ folder from `fedface deploy init`")
    try:
        key = serialization.load_ssh_private_key(raw, None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise PKIError(f"node authentication key {private_path} is not an OpenSSH private key "
                       f"({err}): copy node/auth.key from `fedface deploy init`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"node authentication key {private_path} is a {type(key).__name__}, not "
                       "an EC key on a NIST curve (Flower's node authentication needs one)")
    fp = public_key_fingerprint(key.public_key())
    if public_path is not None:
        expected = public_key_fingerprint(node_public_key(public_path))
        if expected != fp:
            raise PKIError(f"node authentication key {private_path} ({fp}) is not the private "
                           f"key of {public_path} ({expected}): copy both from one site folder")
    return fp
