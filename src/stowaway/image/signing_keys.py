"""Private keys for image signatures: cosign's encrypted key files and plain PEM keys.

``cosign generate-key-pair`` writes an ``ENCRYPTED SIGSTORE PRIVATE KEY`` (older
releases: ``ENCRYPTED COSIGN PRIVATE KEY``) PEM block whose body is JSON: scrypt
parameters and salt (the KDF that turns the password into a 32-byte key), a
``nacl/secretbox`` nonce and the ciphertext of the PKCS#8 DER key. scrypt comes from
``cryptography``; the secretbox (XSalsa20 + Poly1305, which ``cryptography`` lacks)
from PyNaCl's libsodium, which checks the MAC before any byte is used. Plain
``PRIVATE KEY`` (PKCS#8) and ``EC PRIVATE KEY`` (SEC 1) PEM files work too, unencrypted
or with their own password.

Only ECDSA P-256 keys are accepted: what cosign signs and verifies by default.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from stowaway.errors import StowawayError

__all__ = [
    "PasswordSource",
    "SigningKeyError",
    "load_signing_key",
    "public_key_pem",
    "read_signing_key",
]

ENCRYPTED_LABELS = ("ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY")
#: scrypt's N beyond which a key file is refused (cosign writes 2^15 or 2^16): a
#: hostile file must not make us allocate gigabytes.
MAX_SCRYPT_N = 1 << 20
MAX_KEY_FILE = 64 << 10

#: Asked for the password when the key needs one (None: it needs none / not known).
PasswordSource = Callable[[], bytes]


class SigningKeyError(StowawayError):
    """A signing key that cannot be used: names the file and what is wrong with it."""


def load_signing_key(
    data: bytes, password: PasswordSource, *, where: str
) -> ec.EllipticCurvePrivateKey:
    """The ECDSA P-256 private key in ``data`` (a cosign key file or a PEM key);
    ``password`` is called only if the key is encrypted. ``where`` names the file."""
    if len(data) > MAX_KEY_FILE:
        raise SigningKeyError(f"{where}: {len(data)} bytes is too large for a key file")
    text = data.decode("ascii", "replace")
    label = next((x for x in ENCRYPTED_LABELS if f"-----BEGIN {x}-----" in text), None)
    if label is not None:
        der = _decrypt_cosign(_pem_body(text, label, where), password(), where)
        try:
            key = serialization.load_der_private_key(der, None)
        except (ValueError, UnsupportedAlgorithm) as e:
            raise SigningKeyError(f"{where}: the decrypted key is not PKCS#8 ({e})") from None
    elif "-----BEGIN" in text and "PRIVATE KEY-----" in text:
        key = _load_pem(data, password, where)
    else:
        raise SigningKeyError(
            f"{where} is not a private key file",
            hint="use a key from `cosign generate-key-pair` (cosign.key) or a PEM EC key",
        )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SigningKeyError(
            f"{where}: a {type(key).__name__.lstrip('_')} is not an ECDSA key",
            hint="signatures are ECDSA P-256: `cosign generate-key-pair` makes one",
        )
    if not isinstance(key.curve, ec.SECP256R1):
        raise SigningKeyError(
            f"{where}: the key's curve is {key.curve.name}, not P-256 (secp256r1)",
            hint="cosign verifies ECDSA P-256 / SHA-256 signatures",
        )
    return key


def read_signing_key(path: str, password: PasswordSource) -> ec.EllipticCurvePrivateKey:
    """``load_signing_key`` of the file at ``path``."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as e:
        raise SigningKeyError(f"cannot read key {path}: {e.strerror}") from None
    return load_signing_key(data, password, where=path)


def public_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The PKIX ``PUBLIC KEY`` PEM of ``key``: what ``cosign verify --key`` reads."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_pem(data: bytes, password: PasswordSource, where: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, None)
    except TypeError:  # encrypted: it needs the password
        pass
    except (ValueError, UnsupportedAlgorithm) as e:
        raise SigningKeyError(f"{where}: not a readable PEM private key ({e})") from None
    try:
        return serialization.load_pem_private_key(data, password())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise SigningKeyError(
            f"{where}: wrong password (or a damaged key)", hint="check COSIGN_PASSWORD"
        ) from None


def _pem_body(text: str, label: str, where: str) -> bytes:
    begin, end = f"-----BEGIN {label}-----", f"-----END {label}-----"
    start = text.index(begin) + len(begin)
    stop = text.find(end, start)
    if stop < 0:
        raise SigningKeyError(f"{where}: the PEM block has no {end!r} line")
    try:
        return base64.b64decode("".join(text[start:stop].split()), validate=True)
    except binascii.Error:
        raise SigningKeyError(f"{where}: the PEM body is not base64") from None


def _decrypt_cosign(body: bytes, password: bytes, where: str) -> bytes:
    """scrypt the password into a key, open the secretbox (MAC checked first)."""
    try:
        doc = json.loads(body)
        kdf, cipher = doc["kdf"], doc["cipher"]
        if kdf["name"] != "scrypt" or cipher["name"] != "nacl/secretbox":
            raise SigningKeyError(
                f"{where}: unsupported key encryption {kdf['name']}/{cipher['name']}",
                hint="cosign keys use scrypt and nacl/secretbox",
            )
        n, r, p = (int(kdf["params"][k]) for k in ("N", "r", "p"))
        salt = base64.b64decode(kdf["salt"], validate=True)
        nonce = base64.b64decode(cipher["nonce"], validate=True)
        box = base64.b64decode(doc["ciphertext"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise SigningKeyError(
            f"{where}: not a cosign encrypted key (malformed JSON body)"
        ) from None
    if not (1 < n <= MAX_SCRYPT_N and n & (n - 1) == 0 and 0 < r <= 32 and 0 < p <= 16):
        raise SigningKeyError(f"{where}: scrypt parameters N={n} r={r} p={p} are out of range")
    if len(nonce) != 24 or len(box) < 16:
        raise SigningKeyError(f"{where}: the secretbox nonce or ciphertext is truncated")
    key = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)
    plain = _secretbox_open(box, nonce, key)
    if plain is None:
        raise SigningKeyError(
            f"{where}: wrong password (the key's MAC does not match)",
            hint="set COSIGN_PASSWORD or pass --password-file with the key's password",
        )
    return plain


def _secretbox_open(box: bytes, nonce: bytes, key: bytes) -> bytes | None:
    """NaCl ``crypto_secretbox_open`` (libsodium, through PyNaCl): ``box`` is tag +
    ciphertext; None when the Poly1305 tag does not match (wrong key or tampered data)."""
    from nacl.exceptions import CryptoError
    from nacl.secret import SecretBox

    try:
        return bytes(SecretBox(key).decrypt(box, nonce))
    except CryptoError:
        return None
