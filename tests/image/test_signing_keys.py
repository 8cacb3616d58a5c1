"""Signing keys: key pairs the real `cosign generate-key-pair` writes open with their
password (and give cosign's public key), signatures `cosign verify-blob` accepts, and
every wrong key, curve, password or damaged file refused with a message."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from stowaway.image.artifacts import sign_layer, simple_signing_payload
from stowaway.image.signing_keys import SigningKeyError, load_signing_key, public_key_pem

PASSWORD = b"correct horse"
DIGEST = "sha256:" + "ab" * 32


def cosign(*args: str, cwd: Path, password: bytes = PASSWORD) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COSIGN_PASSWORD": password.decode()}
    return subprocess.run(
        ["cosign", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def cosign_pair(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("cosign") is None:
        pytest.fail("cosign is not installed: run scripts/setup.sh")
    d = tmp_path_factory.mktemp("cosign")
    proc = cosign("generate-key-pair", cwd=d)
    assert proc.returncode == 0, proc.stderr
    return d


def test_a_cosign_key_opens_with_its_password_and_gives_cosigns_public_key(
    cosign_pair: Path,
) -> None:
    key = load_signing_key((cosign_pair / "cosign.key").read_bytes(), lambda: PASSWORD, where="k")
    assert public_key_pem(key) == (cosign_pair / "cosign.pub").read_bytes()


def test_cosign_verify_blob_accepts_our_signature(cosign_pair: Path, tmp_path: Path) -> None:
    key = load_signing_key((cosign_pair / "cosign.key").read_bytes(), lambda: PASSWORD, where="k")
    payload = simple_signing_payload("localhost:5000/app", DIGEST)
    (tmp_path / "payload").write_bytes(payload)
    (tmp_path / "sig").write_text(sign_layer(key, payload).signature)
    args = ["verify-blob", "--key", str(cosign_pair / "cosign.pub"), "--signature", "sig",
            "--insecure-ignore-tlog=true", "payload"]  # fmt: skip
    ok = cosign(*args, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "payload").write_bytes(payload.replace(b"ab", b"ac", 1))  # tampered
    assert cosign(*args, cwd=tmp_path).returncode != 0


def test_a_wrong_password_is_refused(cosign_pair: Path) -> None:
    with pytest.raises(SigningKeyError, match="wrong password") as e:
        load_signing_key((cosign_pair / "cosign.key").read_bytes(), lambda: b"nope", where="k.key")
    assert "k.key" in str(e.value) and "COSIGN_PASSWORD" in (e.value.hint or "")


def _rewrite_body(pem: bytes, change: object) -> bytes:
    lines = pem.decode().strip().splitlines()
    doc = json.loads(base64.b64decode("".join(lines[1:-1])))
    assert callable(change)
    change(doc)
    body = base64.b64encode(json.dumps(doc).encode()).decode()
    return f"{lines[0]}\n{body}\n{lines[-1]}\n".encode()


def test_a_tampered_or_hostile_cosign_key_is_refused(cosign_pair: Path) -> None:
    pem = (cosign_pair / "cosign.key").read_bytes()

    def flip(doc: dict[str, str]) -> None:
        raw = bytearray(base64.b64decode(doc["ciphertext"]))
        raw[-1] ^= 1
        doc["ciphertext"] = base64.b64encode(bytes(raw)).decode()

    with pytest.raises(SigningKeyError, match="MAC does not match"):
        load_signing_key(_rewrite_body(pem, flip), lambda: PASSWORD, where="k")

    def huge(doc: dict[str, dict[str, dict[str, int]]]) -> None:
        doc["kdf"]["params"]["N"] = 1 << 40  # terabytes of scrypt memory

    with pytest.raises(SigningKeyError, match="out of range"):
        load_signing_key(_rewrite_body(pem, huge), lambda: PASSWORD, where="k")
    with pytest.raises(SigningKeyError, match="malformed"):
        load_signing_key(_rewrite_body(pem, lambda d: d.pop("kdf")), lambda: PASSWORD, where="k")


def _pem(key: object, password: bytes | None = None) -> bytes:
    enc = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
    )


def test_plain_and_encrypted_pkcs8_p256_keys_load() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    want = public_key_pem(key)
    assert public_key_pem(load_signing_key(_pem(key), lambda: b"", where="k")) == want
    loaded = load_signing_key(_pem(key, b"pw"), lambda: b"pw", where="k")
    assert public_key_pem(loaded) == want
    with pytest.raises(SigningKeyError, match="wrong password"):
        load_signing_key(_pem(key, b"pw"), lambda: b"other", where="k")
    sec1 = key.private_bytes(  # "EC PRIVATE KEY", as openssl ecparam -genkey writes
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    assert b"BEGIN EC PRIVATE KEY" in sec1
    assert public_key_pem(load_signing_key(sec1, lambda: b"", where="k")) == want


def test_other_key_types_and_curves_are_refused() -> None:
    with pytest.raises(SigningKeyError, match="not P-256"):
        load_signing_key(_pem(ec.generate_private_key(ec.SECP384R1())), lambda: b"", where="k")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(SigningKeyError, match="not an ECDSA key"):
        load_signing_key(_pem(rsa_key), lambda: b"", where="k")
    with pytest.raises(SigningKeyError, match="not a private key file"):
        load_signing_key(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                         lambda: b"", where="k")  # fmt: skip
