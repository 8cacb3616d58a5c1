"""A private dockerd in its own network namespace, with a default bridge.

BuildKit runs gateway frontends (our frontend image) on the default network, which is
the ``bridge`` network; the shared ``Dockerd`` runs with ``--bridge none`` so that it
never touches the host's network. In a fresh network namespace dockerd can make its
bridge without affecting the host (and with iptables off, containers there reach
nothing): the frontend only talks to BuildKit over stdin/stdout anyway. With ``netns``
the daemon joins that namespace instead of a new one (see netns.py), so it can reach a
registry running there; only one dockerd at a time may use a namespace (the bridge).
"""

from __future__ import annotations

from pathlib import Path

from netns import Netns

from daemons import Containerd, Dockerd


class NetnsDockerd(Dockerd):
    name = "dockerd-netns"

    def __init__(self, tmpdir: Path, containerd: Containerd, netns: Netns | None = None) -> None:
        super().__init__(tmpdir, containerd)
        self.netns = netns

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--bridge")
        del argv[i : i + 2]
        argv += ["--bip", "10.213.0.1/24"]
        if self.netns is not None:
            return self.netns.wrap(argv)
        return ["unshare", "--net", "--", *argv]
