"""The shipped deployment files (deploy/) hold together: systemd units that systemd
accepts, with ExecStart flags the CLI really has; containerd snippets and the kubelet
config pointing at the units' sockets; Kubernetes manifests with the args, mounts,
privileges and ports the daemons need. (The node files run for real in
tests/runtime/test_deploy_node.py.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml  # type: ignore[import-untyped]

from deploy_files import DEPLOY, HOST_PATHS, PROGRAM, UNITS, exec_start, flag, unit
from stowaway.cli import main
from stowaway.registry.config import config_from_dict, load_config

UNIT_NAMES = [
    "stowaway-serve.service",
    "stowaway-snapshotter.service",
    "stowaway-cri-image-service.service",
]
SNAPSHOTTER_SOCKET = flag(exec_start("stowaway-snapshotter.service"), "--socket")
CRI_SOCKET = flag(exec_start("stowaway-cri-image-service.service"), "--socket")


def command(name: str) -> click.Command:
    ctx = click.Context(main)
    found = main.get_command(ctx, name)
    assert isinstance(found, click.Command), name
    return found


def parse_args(argv: list[str]) -> dict[str, Any]:
    """Parse ``stowaway SUBCOMMAND ARGS`` with the real click command (no invocation):
    an unknown flag, a missing required one or a bad value fails here."""
    name, *args = argv
    with command(name).make_context(name, list(args)) as ctx:
        return dict(ctx.params)


def manifests(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


# -- systemd --------------------------------------------------------------------------


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_units_have_what_systemd_needs_and_flags_the_cli_has(name: str) -> None:
    u = unit(name)
    assert u["Unit"]["Description"]
    assert "multi-user.target" in u["Install"]["WantedBy"].split()
    service = u["Service"]
    assert service["Type"] == "simple" and service["Restart"] in ("always", "on-failure")
    params = parse_args(exec_start(name)[1:])
    assert params  # parsed
    if name == "stowaway-snapshotter.service":
        # mounts made in a private mount namespace would be invisible to containerd
        for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                    "ReadWritePaths", "ReadOnlyPaths", "PrivateMounts", "ProtectKernelModules",
                    "ProtectKernelTunables", "DynamicUser", "User"):  # fmt: skip
            assert key not in service, key
        assert service["RuntimeDirectoryPreserve"] == "yes"
    else:
        assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"
    if name == "stowaway-serve.service":
        assert service["DynamicUser"] == "yes" and service["CapabilityBoundingSet"] == ""
        config = load_config(DEPLOY / "registry.toml")
        assert str(params["config_file"]) == "/etc/stowaway/registry.toml"
        assert config.storage == "/var/lib/" + service["StateDirectory"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    """`systemd-analyze verify` checks every directive; it also wants the program to
    exist, so the copies name this venv's `stowaway` (the only change)."""
    program = str(Path(sys.executable).with_name("stowaway"))
    if not os.access(program, os.X_OK):
        program = shutil.which("true") or "/bin/true"
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text()
        (tmp_path / name).write_text(text.replace(PROGRAM, program))
    # it exits 0 even for unknown keys or bad values, and prints them: so the check is
    # that it prints nothing (shown to catch a bad unit first)
    (tmp_path / "bad.service").write_text("[Service]\nExecStart=/bin/true\nProtectSystm=yes\n")
    assert "Unknown key" in verify([tmp_path / "bad.service"])
    assert verify([tmp_path / n for n in UNIT_NAMES]) == ""


def verify(paths: list[Path]) -> str:
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, paths)], capture_output=True, text=True
    )
    # units named in After=/Before=/Requires= (containerd, kubelet) need not exist here
    return "\n".join(ln for ln in (r.stdout + r.stderr).splitlines() if "not found" not in ln)


# -- containerd and kubelet ---------------------------------------------------------------


def test_containerd_v2_snippet_wires_the_snapshotter_unit() -> None:
    doc = tomllib.loads((DEPLOY / "containerd" / "config-v2.toml").read_text())
    assert doc["version"] == 2
    assert doc["proxy_plugins"]["stowaway"] == {"type": "snapshot", "address": SNAPSHOTTER_SOCKET}
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]
    assert cri == {"snapshotter": "stowaway", "disable_snapshot_annotations": False}


def test_containerd_v3_snippet_has_the_2x_layout() -> None:
    """containerd 2.x: documented, not run (no 2.x on Debian 12 or 13)."""
    doc = tomllib.loads((DEPLOY / "containerd" / "config-v3.toml").read_text())
    assert doc["version"] == 3
    assert doc["proxy_plugins"]["stowaway"] == {"type": "snapshot", "address": SNAPSHOTTER_SOCKET}
    images = doc["plugins"]["io.containerd.cri.v1.images"]
    assert images == {"snapshotter": "stowaway", "disable_snapshot_annotations": False}


def test_kubelet_config_names_the_cri_image_service_socket() -> None:
    doc = yaml.safe_load((DEPLOY / "kubelet" / "kubelet-config.yaml").read_text())
    assert doc["kind"] == "KubeletConfiguration"
    assert doc["imageServiceEndpoint"] == f"unix://{CRI_SOCKET}"
    containerd = flag(exec_start("stowaway-cri-image-service.service"), "--containerd")
    assert doc["containerRuntimeEndpoint"] == f"unix://{containerd}"
    assert flag(exec_start("stowaway-cri-image-service.service"), "--snapshotter") == "stowaway"


# -- Kubernetes -------------------------------------------------------------------------


def test_node_daemonset_runs_the_snapshotter_as_containerd_expects() -> None:
    ds = one(manifests("node-daemonset.yaml"), "DaemonSet")
    assert ds["metadata"]["namespace"] == "stowaway"
    spec = ds["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] and c["command"] == ["stowaway"]
    params = parse_args(c["args"])
    assert c["securityContext"]["privileged"] is True
    volumes = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path, m in mounts.items():
        assert volumes[m["name"]] == path, "host paths are mounted at the same path"
    store = mounts[str(params["store"])]
    assert store["mountPath"] == "/nix/store" and store["readOnly"] is True
    assert mounts["/nix/var/nix/db"]["readOnly"] is True  # validity checks, read-only
    sockdir = str(Path(params["socket"]).parent)
    assert str(params["socket"]) == SNAPSHOTTER_SOCKET  # what containerd's snippet names
    assert mounts[sockdir]["mountPropagation"] == "Bidirectional"  # the stub-tree tmpfs
    assert not mounts[sockdir].get("readOnly")
    assert str(params["root"]) in mounts and str(params["gcroots"]) in mounts
    # the same flags as the systemd unit, apart from what only a pod needs
    unit_params = parse_args(exec_start("stowaway-snapshotter.service")[1:])
    assert {**params, "containerd_version": None} == unit_params


def test_serve_deployment_config_secret_and_service_fit_together() -> None:
    docs = manifests("serve.yaml")
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    configmap, secret = one(docs, "ConfigMap"), one(docs, "Secret")
    spec = deployment["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["image"] and c["command"] == ["stowaway"]
    params = parse_args(c["args"])
    config_path = Path(params["config_file"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    config_volume = volumes[mounts[str(config_path.parent)]["name"]]
    assert config_volume["configMap"]["name"] == configmap["metadata"]["name"]
    config = config_from_dict(tomllib.loads(configmap["data"][config_path.name]), "ConfigMap")
    assert config.storage.startswith("s3://") and config.s3.access_key is None
    assert config.nix.index is not None and config.nix.index.parent == config_path.parent
    assert config.nix.index.name in configmap["data"]
    assert config.nix.substituters and config.nix.trusted_public_keys  # no /nix/store here
    assert config.nix.cache_dir is not None and str(config.nix.cache_dir) in mounts
    # S3 credentials from the Secret, as the variables boto3 reads
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    for var, key in (("AWS_ACCESS_KEY_ID", "access-key"), ("AWS_SECRET_ACCESS_KEY", "secret-key")):
        assert env[var] == {"name": secret["metadata"]["name"], "key": key}
        assert key in secret["stringData"]
    # the Service reaches the port serve listens on
    port = int(params["listen"].rpartition(":")[2])
    (container_port,) = c["ports"]
    assert container_port["containerPort"] == port
    (svc_port,) = service["spec"]["ports"]
    assert svc_port["targetPort"] in (port, container_port["name"])
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def test_every_manifest_is_namespaced_like_the_namespace_file() -> None:
    (ns,) = manifests("namespace.yaml")
    for name in ("node-daemonset.yaml", "serve.yaml"):
        for doc in manifests(name):
            assert doc["metadata"]["namespace"] == ns["metadata"]["name"], (name, doc["kind"])


def test_docs_list_every_substituted_host_path() -> None:
    """docs/deploy.md's table of host paths is the tests' substitution list."""
    doc = (DEPLOY.parent / "docs" / "deploy.md").read_text()
    for prefix in HOST_PATHS:
        assert f"`{prefix}`" in doc, prefix
