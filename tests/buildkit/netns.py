"""A network namespace shared by test daemons: a registry and dockerds one after another.

``dockerd_netns.NetnsDockerd`` alone gives each dockerd a namespace of its own, whose
loopback nothing else can reach. The cache import tests need a registry that a first
dockerd pushes to and a second, fresh dockerd pulls from, so both daemons and the
registry join one namespace, held open by a sleeping process and stopped by its pid.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from types import TracebackType
from typing import Self

from daemons import DaemonError, Registry, wait_for


class Netns:
    """A fresh network namespace (loopback up) that commands join with ``wrap``."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def path(self) -> str:
        assert self.proc is not None
        return f"/proc/{self.proc.pid}/ns/net"

    def wrap(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--", "sleep", "infinity"], start_new_session=True
        )

        proc = self.proc

        def unshared() -> bool:
            if proc.poll() is not None:
                raise DaemonError("unshare --net exited")
            return os.readlink(self.path) != os.readlink("/proc/self/ns/net")

        try:
            wait_for(unshared, 10, "unshare --net to make a network namespace", interval=0.01)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        subprocess.run(self.wrap(["ip", "link", "set", "lo", "up"]), check=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()


class NetnsRegistry(Registry):
    """docker-registry inside ``netns``: reachable by daemons there at ``host``."""

    def __init__(self, tmpdir: Path, netns: Netns) -> None:
        super().__init__(tmpdir)
        self.netns = netns

    def argv(self) -> list[str]:
        return self.netns.wrap(super().argv())

    def ready(self) -> bool:
        r = subprocess.run(
            self.netns.wrap(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", self.url + "/v2/"]
            ),
            capture_output=True,
            text=True,
        )
        return r.stdout == "200"
