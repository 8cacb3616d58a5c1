"""Real daemons for tests, each on private sockets/ports under a temp dir.

Why: tests talk to the real containerd, docker-registry and dockerd, never to the
system-wide instances. Each class starts its daemon in ``__enter__`` (or ``start()``),
waits until it answers, and stops it by its own pid (SIGTERM, then SIGKILL) in
``__exit__``. Logs go to files (``.log_path``, ``.log_text()``); when a daemon does not
come up in time the error shows the tail of its log.

Unix sockets live in a short directory under /tmp (socket paths are limited to 107
bytes, pytest's tmp dirs can be longer); state lives in the given tmpdir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from stowaway.errors import StowawayError

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


T = TypeVar("T")


class DaemonError(StowawayError):
    """A test daemon that did not start (the message carries its log tail)."""


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something true, and return that; an exception
    in ``ignore`` counts as "not yet". After ``timeout`` seconds the test fails with
    "timed out waiting for WHAT". The one way tests wait for a condition: no fixed
    sleeps before an assert."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except ignore:
            result = None
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _short_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _unmount_under(*dirs: Path) -> None:
    """Lazily unmount anything a daemon left mounted below dirs (deepest first)."""
    prefixes = tuple(str(d.resolve()) + "/" for d in dirs)
    with open("/proc/self/mountinfo") as f:
        points = [ln.split()[4].replace("\\040", " ") for ln in f]
    for mp in sorted((p for p in points if p.startswith(prefixes)), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True)


class Daemon:
    """A process started from argv, logging to a file, stopped by pid."""

    name = "daemon"

    def __init__(self, tmpdir: Path) -> None:
        self.dir = Path(tmpdir) / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- to override ---------------------------------------------------------
    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def cleanup(self) -> None:
        """Extra teardown after the process is gone."""

    # -- lifecycle -----------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (code := self.proc.poll()) is not None:
                self.stop()
                raise DaemonError(
                    f"{self.name} exited with {code} while starting; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self.ready():
                return
            time.sleep(0.05)
        self.stop()
        raise DaemonError(
            f"{self.name} did not answer within {timeout:.0f}s; "
            f"log {self.log_path}:\n{_tail(self.log_path)}"
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self.cleanup()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _toml(value: object) -> str:
    """A TOML value for the small configs below (strings, numbers, bools, lists)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # TOML basic strings share JSON's escapes
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


class Containerd(Daemon):
    """A private containerd (config version 2): own root, state, sockets; CRI off by default.

    Use a namespace of your own in `ctr` calls; runc keeps its state under
    /run/containerd/runc/<namespace>/<id>.
    """

    name = "containerd"

    def __init__(
        self,
        tmpdir: Path,
        *,
        cri: bool = False,
        cni_bin_dir: str = "/usr/lib/cni",
        cni_conf_dir: str | None = None,
        proxy_plugins: Mapping[str, Mapping[str, str]] | None = None,
        namespace: str = "stowaway-test",
    ) -> None:
        super().__init__(tmpdir)
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.sockdir = _short_dir("ctrd-")
        self.address = str(self.sockdir / "c.sock")
        self.namespace = namespace
        self.config_path = self.dir / "config.toml"
        self.config_path.write_text(
            self._config(cri, cni_bin_dir, cni_conf_dir or str(self.dir / "cni"), proxy_plugins)
        )

    def _private_top(self) -> list[str]:
        """This instance's own root and state (top-level keys)."""
        return [f"root = {_toml(str(self.root))}", f"state = {_toml(str(self.state))}"]

    def _private_tables(self) -> list[str]:
        """This instance's own sockets and plugin dir: nothing shared with the machine's."""
        return [
            "[grpc]",
            f"  address = {_toml(self.address)}",
            "[ttrpc]",
            f"  address = {_toml(str(self.sockdir / 't.sock'))}",
            "[debug]",
            f"  address = {_toml(str(self.sockdir / 'd.sock'))}",
            '  level = "info"',
            "[metrics]",
            '  address = ""',
            '[plugins."io.containerd.internal.v1.opt"]',
            f"  path = {_toml(str(self.dir / 'opt'))}",
        ]

    def _private_cri(self, cni_bin_dir: str, cni_conf_dir: str) -> list[str]:
        """CRI's streaming server on loopback and its CNI dirs."""
        Path(cni_conf_dir).mkdir(parents=True, exist_ok=True)
        return [
            '[plugins."io.containerd.grpc.v1.cri"]',
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            '[plugins."io.containerd.grpc.v1.cri".cni]',
            f"  bin_dir = {_toml(cni_bin_dir)}",
            f"  conf_dir = {_toml(cni_conf_dir)}",
        ]

    def _config(
        self,
        cri: bool,
        cni_bin_dir: str,
        cni_conf_dir: str,
        proxy_plugins: Mapping[str, Mapping[str, str]] | None,
    ) -> str:
        disabled = [] if cri else ["io.containerd.grpc.v1.cri"]
        lines = [
            "version = 2",
            *self._private_top(),
            f"disabled_plugins = {_toml(disabled)}",
            *self._private_tables(),
        ]
        if cri:
            lines += [
                *self._private_cri(cni_bin_dir, cni_conf_dir),
                '[plugins."io.containerd.grpc.v1.cri".containerd]',
                '  snapshotter = "overlayfs"',
            ]
        for pname, opts in sorted((proxy_plugins or {}).items()):
            lines.append(f"[proxy_plugins.{_toml(pname)}]")
            lines += [f"  {k} = {_toml(v)}" for k, v in sorted(opts.items())]
        return "\n".join(lines) + "\n"

    def argv(self) -> list[str]:
        if os.path.exists(self.address):  # stale socket from a crashed run
            os.unlink(self.address)
        return [
            "containerd",
            "--root",
            str(self.root),
            "--state",
            str(self.state),
            "--address",
            self.address,
            "--config",
            str(self.config_path),
        ]

    def ready(self) -> bool:
        if not os.path.exists(self.address):
            return False
        r = subprocess.run(["ctr", "-a", self.address, "version"], capture_output=True)
        return r.returncode == 0

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120, namespace: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `ctr -a SOCK -n NS ARGS…`; on failure raise with ctr's output."""
        cmd = ["ctr", "-a", self.address, "-n", namespace or self.namespace, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise DaemonError(
                f"`{' '.join(cmd)}` failed ({r.returncode}):\n{r.stdout}{r.stderr}\n"
                f"containerd log tail:\n{_tail(self.log_path, 15)}"
            )
        return r

    def _shim_pids(self) -> list[int]:
        """Pids of runc shims started for this containerd (their argv names our socket)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"containerd-shim-runc-v2") and self.address.encode() in argv:
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self._shim_pids():
            self._kill_tasks()
        super().stop()

    def _kill_tasks(self) -> None:
        """Kill and delete tasks left running, so their shims exit on their own."""
        for ns in self.ctr("namespaces", "ls", "-q", check=False).stdout.split():
            for task in self.ctr("tasks", "ls", "-q", namespace=ns, check=False).stdout.split():
                self.ctr("tasks", "kill", "-s", "SIGKILL", task, namespace=ns, check=False)
                time.sleep(0.1)
                self.ctr("tasks", "delete", "-f", task, namespace=ns, check=False)

    def cleanup(self) -> None:
        for pid in self._shim_pids():  # shims of tasks we could not delete
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _unmount_under(self.root, self.state)
        shutil.rmtree(self.sockdir, ignore_errors=True)


class Registry(Daemon):
    """Debian's docker-registry (distribution 2.8) on 127.0.0.1:<free port>.

    `htpasswd` maps user → password; when given, the registry requires basic auth.
    """

    name = "registry"

    def __init__(self, tmpdir: Path, htpasswd: Mapping[str, str] | None = None) -> None:
        super().__init__(tmpdir)
        self.storage = self.dir / "storage"
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self.config_path = self.dir / "config.yml"
        self.auth = dict(htpasswd or {})
        auth = ""
        if self.auth:
            import bcrypt  # only needed for auth; distribution accepts bcrypt hashes only

            pw_file = self.dir / "htpasswd"
            pw_file.write_text(
                "".join(
                    f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}\n"
                    for u, p in sorted(self.auth.items())
                )
            )
            auth = f"auth:\n  htpasswd:\n    realm: stowaway-test\n    path: {pw_file}\n"
        self.config_path.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  accesslog:\n    disabled: false\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n" + auth
        )

    def argv(self) -> list[str]:
        return ["docker-registry", "serve", str(self.config_path)]

    def env(self) -> dict[str, str]:
        # The Debian service sets no env; make sure a stray REGISTRY_* var cannot override.
        return {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                return True
        except urllib.error.HTTPError as e:
            e.close()
            return e.code == 401  # up, and asking for credentials
        except OSError:
            return False

    def blob_bytes(self) -> int:
        """Total size of the blobs stored (what pushes have uploaded, deduplicated)."""
        blobs = self.storage / "docker/registry/v2/blobs"
        return sum(p.stat().st_size for p in blobs.rglob("data")) if blobs.exists() else 0


FLIGHTCONTROL_FLAKE = b"flightcontrol: exceeded retry timeout"


class Dockerd(Daemon):
    """A private dockerd on its own socket, data-root and exec-root, using a private containerd.

    No bridge and no iptables rules: it must not touch the host's network.
    """

    name = "dockerd"

    def __init__(self, tmpdir: Path, containerd: Containerd) -> None:
        super().__init__(tmpdir)
        self.containerd = containerd
        self.data_root = self.dir / "data"
        self.sockdir = _short_dir("dkrd-")
        self.exec_root = self.sockdir / "exec"
        self.address = str(self.sockdir / "d.sock")
        self.host = f"unix://{self.address}"
        self.pidfile = self.dir / "dockerd.pid"
        self.config_path = self.dir / "daemon.json"
        self.config_path.write_text("{}\n")  # never read /etc/docker/daemon.json
        self.client_config = self.dir / "client"
        self.client_config.mkdir(exist_ok=True)

    def argv(self) -> list[str]:
        if os.path.exists(self.address):
            os.unlink(self.address)
        return [
            "dockerd",
            "--data-root",
            str(self.data_root),
            "--exec-root",
            str(self.exec_root),
            "-H",
            self.host,
            "--pidfile",
            str(self.pidfile),
            "--containerd",
            self.containerd.address,
            "--config-file",
            str(self.config_path),
            "--bridge",
            "none",
            "--iptables=false",
            "--ip-masq=false",
            "--storage-driver",
            "overlay2",
        ]

    def client_env(self, buildkit: bool = True) -> dict[str, str]:
        env = dict(os.environ)
        env.update(DOCKER_HOST=self.host, DOCKER_CONFIG=str(self.client_config))
        if buildkit:
            env["DOCKER_BUILDKIT"] = "1"
        return env

    def ready(self) -> bool:
        if not os.path.exists(self.address):
            return False
        r = subprocess.run(
            ["/usr/bin/docker", "version"], capture_output=True, env=self.client_env()
        )
        return r.returncode == 0

    def docker(
        self, *args: str, check: bool = True, timeout: float = 300, input: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """Run `/usr/bin/docker` (Debian 12: 20.10; Debian 13: docker-cli 26 with buildx), with
        BuildKit on, against this daemon."""
        cmd = ["/usr/bin/docker", *args]
        for _ in range(2):
            r = subprocess.run(
                cmd, capture_output=True, env=self.client_env(), timeout=timeout, input=input
            )
            # BuildKit v0.8 sometimes fails a FileOp with many copy actions with this
            # transient error (moby/buildkit#1822, fixed upstream later); one retry passes.
            if r.returncode == 0 or FLIGHTCONTROL_FLAKE not in r.stdout + r.stderr:
                break
        if check and r.returncode != 0:
            raise DaemonError(
                f"`{' '.join(cmd)}` failed ({r.returncode}):\n"
                f"{r.stdout.decode(errors='replace')}{r.stderr.decode(errors='replace')}\n"
                f"dockerd log tail:\n{_tail(self.log_path, 15)}"
            )
        return r

    def cleanup(self) -> None:
        _unmount_under(self.data_root, self.exec_root)
        shutil.rmtree(self.sockdir, ignore_errors=True)
