"""A private dockerd in its own network namespace, with a default bridge.

BuildKit runs gateway frontends (our frontend image) on the default network, which is
the ``bridge`` network; the shared ``Dockerd`` runs with ``--bridge none`` so that it
never touches the host's network. In a fresh network namespace dockerd can make its
bridge without affecting the host (and with iptables off, containers there reach
nothing): the frontend only talks to BuildKit over stdin/stdout anyway.
"""

from __future__ import annotations

from daemons import Dockerd


class NetnsDockerd(Dockerd):
    name = "dockerd-netns"

    def argv(self) -> list[str]:
        argv = super().argv()
        i = argv.index("--bridge")
        del argv[i : i + 2]
        return ["unshare", "--net", "--", *argv, "--bip", "10.213.0.1/24"]
