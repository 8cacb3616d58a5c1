"""The frontend image pushed to `stowaway serve` and used from there (issue 5).

The frontend image archive (scripts/frontend-image.sh -o) is pushed with skopeo into a
`stowaway serve --no-compose` registry; a private dockerd that does not have the image
then runs `docker build --build-arg BUILDKIT_SYNTAX=<registry>/stowaway/frontend:…`, so
BuildKit has to pull the frontend from our registry. The registry, skopeo and the
dockerd share one network namespace (netns.py), where 127.0.0.1 is the registry's and
dockerd treats it as an insecure (plain HTTP) registry.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from buildkit_helpers import GRAPH, cached_steps, out_path, script_image
from dockerd_netns import NetnsDockerd
from netns import Netns

from daemons import Containerd, Daemon, free_port
from stowaway.buildkit.context import make_context
from stowaway.image.config import ImageOptions

REPO = "stowaway/frontend"
TAG = "issue5"

pytestmark = pytest.mark.slow


class NetnsServe(Daemon):
    """`stowaway serve` as a plain registry (pushes allowed, no auth) inside ``netns``."""

    name = "stowaway-serve"

    def __init__(self, tmpdir: Path, netns: Netns) -> None:
        super().__init__(tmpdir)
        self.netns = netns
        self.host = f"127.0.0.1:{free_port()}"
        self.storage = self.dir / "storage"

    def argv(self) -> list[str]:
        serve = [sys.executable, "-m", "stowaway", "serve", "--no-compose"]
        serve += ["--listen", self.host, "--storage", str(self.storage)]
        return self.netns.wrap(serve)

    def ready(self) -> bool:
        url = f"http://{self.host}/v2/"
        curl = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url]
        r = subprocess.run(self.netns.wrap(curl), capture_output=True, text=True)
        return r.stdout == "200"

    def access_log(self) -> list[dict[str, object]]:
        """The JSON access log lines (logger stowaway.registry.access) so far."""
        lines = self.log_text().splitlines()
        return [json.loads(ln) for ln in lines if ln.startswith('{"method"')]


@dataclass
class Run:
    manifest: dict[str, object]  # as pushed by skopeo
    manifest_digest: str
    local_before: int  # `docker image inspect` exit code right before the build
    build_log: str
    run_output: str
    pulls: list[dict[str, object]]  # access log entries of the build


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, have_nix: None) -> Run:
    tmp = tmp_path_factory.mktemp("bkreg")
    archive = tmp / "frontend.tar"
    with (
        Netns() as netns,
        NetnsServe(tmp, netns) as registry,
        Containerd(tmp) as ctrd,
        NetnsDockerd(tmp, containerd=ctrd, netns=netns) as dockerd,
    ):
        local_tag = script_image(dockerd, "frontend-image.sh", "-o", str(archive))
        # the script loaded the image into this dockerd: drop it, so BuildKit must pull
        dockerd.docker("rmi", local_tag)
        ref = f"{registry.host}/{REPO}:{TAG}"
        skopeo = ["skopeo", "copy", "--dest-tls-verify=false"]
        pushed = subprocess.run(
            netns.wrap([*skopeo, f"docker-archive:{archive}", f"docker://{ref}"]),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert pushed.returncode == 0, pushed.stderr[-3000:]
        inspect = ["skopeo", "inspect", "--tls-verify=false", "--raw", f"docker://{ref}"]
        raw = subprocess.run(netns.wrap(inspect), check=True, capture_output=True, timeout=60)
        manifest = json.loads(raw.stdout)
        digest = "sha256:" + hashlib.sha256(raw.stdout).hexdigest()
        local_before = dockerd.docker("image", "inspect", ref, check=False).returncode
        local_before |= dockerd.docker("image", "inspect", local_tag, check=False).returncode
        seen = len(registry.access_log())
        opts = ImageOptions(entrypoint=[out_path(GRAPH, "app", {"salt": ""}) + "/bin/app"])
        ctx = make_context(str(GRAPH), ["app"], tmp / "ctx", opts, argstrs={"salt": ""}).path
        built = dockerd.docker(
            "build", "--progress=plain", "-f", str(ctx / "stowaway.json"),
            "--build-arg", f"BUILDKIT_SYNTAX={ref}", "-t", "from-registry:1", str(ctx),
            timeout=600,
        )  # fmt: skip
        out = dockerd.docker("run", "--rm", "--network", "none", "from-registry:1").stdout
        pulls = registry.access_log()[seen:]
    log = (built.stdout + built.stderr).decode(errors="replace")
    return Run(manifest, digest, local_before, log, out.decode(), pulls)


def test_dockerd_did_not_have_the_frontend_locally(run: Run) -> None:
    assert run.local_before != 0


def test_build_with_the_pulled_frontend_runs(run: Run) -> None:
    steps = cached_steps(run.build_log)
    assert len(steps) == 12 and not any(steps.values()), run.build_log[-3000:]
    assert "alpha\nbeta\nbeta\ngamma tool\nsplit library\ngreeting=hello\n" in run.run_output


def test_frontend_manifest_and_blobs_came_from_the_registry(run: Run) -> None:
    """BuildKit fetched the pushed manifest and every blob of it, whole, from us."""
    served = {(e["method"], e["path"]): e["bytes"] for e in run.pulls if e["status"] == 200}
    by_tag = ("GET", f"/v2/{REPO}/manifests/{TAG}")
    by_digest = ("GET", f"/v2/{REPO}/manifests/{run.manifest_digest}")
    assert by_tag in served or by_digest in served, run.pulls
    config = run.manifest["config"]
    layers = run.manifest["layers"]
    assert isinstance(config, dict) and isinstance(layers, list) and layers
    for blob in [config, *layers]:
        key = ("GET", f"/v2/{REPO}/blobs/{blob['digest']}")
        assert served.get(key) == blob["size"], (key, run.pulls)
