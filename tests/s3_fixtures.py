"""S3 fixtures for the registry tests that need a bucket (``test_s3``,
``test_nix_resolver``): a moto server per test module and a fresh bucket per test.
Registered for every test by ``pytest_plugins`` in ``tests/conftest.py``; the moto
server starts only for tests that ask for it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import boto3  # type: ignore[import-untyped]
import pytest

from daemons import free_port, wait_for

CREDS = {"access_key": "testing", "secret_key": "testing", "region": "us-east-1"}


def _answers(url: str) -> bool:
    urllib.request.urlopen(url, timeout=1).close()
    return True


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url + "/moto-api/"), 10, "the moto server", ignore=(OSError,))
        yield url
    finally:
        os.kill(proc.pid, 15)
        proc.wait(10)
        log.close()


@pytest.fixture()
def bucket(moto_endpoint: str, request: pytest.FixtureRequest) -> str:
    name = "reg-" + hashlib.sha256(request.node.name.encode()).hexdigest()[:12]
    s3 = boto3.client(
        "s3",
        endpoint_url=moto_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    s3.create_bucket(Bucket=name)
    return name
