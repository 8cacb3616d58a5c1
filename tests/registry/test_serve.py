"""``stowaway serve --no-compose`` (a plain registry) as a real process: TOML config,
TLS, JSON access log on stderr, graceful shutdown on SIGTERM."""

from __future__ import annotations

import datetime
import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from registry_helpers import skopeo

from daemons import free_port, wait_for
from stowaway.registry.config import RegistryConfigError, config_from_dict, load_config


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=36500))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_serve_process_tls_logs_and_sigterm(tmp_path: Path, oci_layout: Path) -> None:
    cert, key = self_signed(tmp_path)
    port = free_port()
    config = tmp_path / "registry.toml"
    config.write_text(
        f'listen = "127.0.0.1:{port}"\nstorage = "{tmp_path / "store"}"\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\nmax_upload_size = 100000000\n'
    )
    assert load_config(config).max_upload_size == 100000000
    stderr = open(tmp_path / "stderr", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "stowaway", "serve", "--no-compose", "--config", str(config)],
        stderr=stderr,
    )
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:

        def healthy() -> bool:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=ctx).close()
            return True

        wait_for(healthy, 10, "the registry process to come up", ignore=(OSError,))
        skopeo("copy", "--dest-tls-verify=false", f"oci:{oci_layout}:t",
               f"docker://127.0.0.1:{port}/tls/busybox:1")  # fmt: skip
        info = json.loads(
            skopeo("inspect", "--tls-verify=false", f"docker://127.0.0.1:{port}/tls/busybox:1")
        )
        assert info["Name"] == f"127.0.0.1:{port}/tls/busybox"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        code = proc.wait(20)
        stderr.close()
    assert code == 0
    lines = [
        json.loads(x) for x in (tmp_path / "stderr").read_text().splitlines() if x.startswith("{")
    ]
    assert any(x["method"] == "PUT" and x["status"] == 201 for x in lines)
    assert all(
        {"method", "path", "status", "bytes", "duration_ms", "remote"} <= set(x) for x in lines
    )


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(RegistryConfigError, match="unknown key 'colour'"):
        config_from_dict({"colour": "blue"})
    with pytest.raises(RegistryConfigError, match="anonymous_read has the wrong type"):
        config_from_dict({"anonymous_read": "yes"})
    with pytest.raises(RegistryConfigError, match="max_upload_size has the wrong type"):
        config_from_dict({"max_upload_size": True})
    with pytest.raises(RegistryConfigError, match="go together"):
        config_from_dict({"tls_cert": "/x"})
    with pytest.raises(RegistryConfigError, match="HOST:PORT"):
        config_from_dict({"listen": "nowhere"})
    bad = tmp_path / "bad.toml"
    bad.write_text("listen = \n")
    with pytest.raises(RegistryConfigError, match=str(bad)):
        load_config(bad)
    cfg = config_from_dict({"tokens": ["a"], "s3": {"endpoint": "http://x"}})
    assert cfg.tokens == ("a",) and cfg.s3.endpoint == "http://x" and cfg.auth_enabled


def test_nix_layer_base_key() -> None:
    cfg = config_from_dict({"nix": {"layer_base": ["shell", "python3"]}})
    assert cfg.nix.layer_base == ("shell", "python3")
    assert config_from_dict({}).nix.layer_base == ()
    with pytest.raises(RegistryConfigError, match=r"\[nix\] layer_base has the wrong type"):
        config_from_dict({"nix": {"layer_base": "shell"}})
    with pytest.raises(RegistryConfigError, match="layer_base must be a list of strings"):
        config_from_dict({"nix": {"layer_base": ["shell", 3]}})
