"""Prometheus counters in the text exposition format, written by hand: a handful
of counters does not justify a dependency and a global registry."""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, int]] = Counter()  # (method, status)
        self.bytes_served = 0
        self.bytes_received = 0
        self.builds = 0
        self.build_failures = 0

    def observe(self, method: str, status: int, sent: int) -> None:
        self.requests[(method, status)] += 1
        self.bytes_served += sent

    def render(self) -> str:
        lines = [
            "# HELP stowaway_registry_requests_total HTTP requests by method and status.",
            "# TYPE stowaway_registry_requests_total counter",
        ]
        for (method, status), n in sorted(self.requests.items()):
            lines.append(
                f'stowaway_registry_requests_total{{method="{method}",status="{status}"}} {n}'
            )
        for name, help_, value in (
            ("bytes_served_total", "Response body bytes sent.", self.bytes_served),
            ("bytes_received_total", "Blob bytes accepted from uploads.", self.bytes_received),
            ("builds_total", "Manifests produced by the resolver.", self.builds),
            ("build_failures_total", "Resolver calls that failed.", self.build_failures),
        ):
            lines += [
                f"# HELP stowaway_registry_{name} {help_}",
                f"# TYPE stowaway_registry_{name} counter",
                f"stowaway_registry_{name} {value}",
            ]
        return "\n".join(lines) + "\n"
