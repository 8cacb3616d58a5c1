"""On-demand nix-build is work clients can cause: the fences around it, against the
real server and real nix-builds of sandboxed derivations (some of which sleep)."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
from registry_harness import Reply, Server
from registry_helpers import MakeNix, demo_packages, hash_of, write_demo_index

from nixtools import SANDBOXED_MK
from stowaway.registry.config import RegistryConfigError, config_from_dict
from stowaway.registry.lru import BoundedCache
from stowaway.registry.nix_build import NixBuild, NixBuildError

# No binary cache; builds as root outside the sandbox (the derivations need nothing but
# store paths): concurrent builds as nixbld users were seen killed (signal 9) under load
# when Nix cleaned up a build user's processes, and a root build in the sandbox needs
# user namespaces, which a chroot (the clean room) cannot create.
NO_SUBSTITUTERS = (
    "--option", "substituters", "", "--option", "build-users-group", "",
    "--option", "sandbox", "false",
)  # fmt: skip
SLEEP = 3  # seconds each slow derivation's build takes

EXPR = """let
  mk = @MK@;
  slow = n: mk "slow-${toString n}-@STAMP@" "sleep @SLEEP@; mkdir $out";
in builtins.listToAttrs
  (builtins.genList (n: { name = "slow${toString n}"; value = slow n; }) 8)
// {
  tool = mk "tool-@STAMP@" "mkdir -p $out/bin; echo @STAMP@ > $out/bin/tool";
  broken = mk "broken-@STAMP@" "sleep 2; echo boom >&2; exit 1";
  flaky = if builtins.pathExists @FLAG@ then mk "flaky-@STAMP@" "mkdir $out"
          else throw "flaky is not ready";
  pkgs = { inner = mk "inner-@STAMP@" "mkdir $out"; deeper.x = mk "x-@STAMP@" "mkdir $out"; };
} // builtins.listToAttrs (builtins.genList
  (n: { name = "t${toString n}"; value = mk "t${toString n}-@STAMP@" "mkdir $out"; }) 8)
"""


def write_expr(tmp_path: Path) -> Path:
    """Fresh derivations (a new stamp): each test really builds them."""
    expr = tmp_path / "pkgs.nix"
    text = EXPR.replace("@MK@", SANDBOXED_MK).replace("@STAMP@", str(time.time_ns()))
    expr.write_text(text.replace("@SLEEP@", str(SLEEP)).replace("@FLAG@", str(tmp_path / "flag")))
    return expr


def timed_get(server: Server, name: str) -> tuple[Reply, float]:
    started = time.monotonic()
    reply = server.request("GET", f"/v2/{name}/manifests/latest")
    return reply, time.monotonic() - started


def message(reply: Reply) -> str:
    return str(json.loads(reply.body)["errors"][0]["message"])


def test_failures_are_remembered_until_they_expire(
    make_nix: MakeNix,  # noqa: F811
    demo_index: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    expr = write_expr(tmp_path)
    server, resolver = make_nix(
        index=demo_index,
        nix_build=True,
        nix_expr=str(expr),
        nix_build_args=NO_SUBSTITUTERS,
        nix_build_failure_ttl=2.5,
    )
    nix = resolver.nix_build
    assert nix is not None
    first, took = timed_get(server, "broken")
    assert first.status == 404 and first.code == "MANIFEST_UNKNOWN", first.body
    assert "failed" in message(first) and took >= 2  # the builder sleeps 2 s, then fails
    again, took = timed_get(server, "demo/broken")  # another image, the same failing name
    assert again.status == 404 and again.code == "MANIFEST_UNKNOWN"
    assert message(again) == message(first).replace("broken:latest", "demo/broken:latest")
    assert took < 1, "answered from memory, not by building again"
    assert nix.runs == 1

    # "no such attribute" is remembered too
    r = server.request("GET", "/v2/nosuchattr/manifests/latest")
    assert r.status == 404 and "unknown package: nosuchattr" in message(r)
    r = server.request("GET", "/v2/demo/nosuchattr/manifests/latest")
    assert r.status == 404 and "unknown package: nosuchattr" in message(r)
    assert nix.runs == 2

    # an evaluation error, remembered for the TTL even once it would succeed
    r = server.request("GET", "/v2/flaky/manifests/latest")
    assert r.status == 404 and "flaky is not ready" in message(r)
    failed_at = time.monotonic()
    (tmp_path / "flag").write_text("")
    r = server.request("GET", "/v2/flaky/manifests/latest")
    assert r.status == 404 and "flaky is not ready" in message(r)
    assert nix.runs == 3
    time.sleep(max(0.0, failed_at + 2.7 - time.monotonic()))
    r = server.request("GET", "/v2/flaky/manifests/latest")  # expired: nix runs again
    assert r.status == 200, r.body
    assert nix.runs == 4


def test_only_permitted_attribute_paths_are_built(
    make_nix: MakeNix,  # noqa: F811
    demo_closure: list[str],
    tmp_path: Path,
) -> None:
    expr = write_expr(tmp_path)
    packages = demo_packages(demo_closure)
    index = write_demo_index(tmp_path / "index.json", {**packages, "py.requests": packages["demo"]})
    nix = {"nix_build": True, "nix_expr": str(expr), "nix_build_args": NO_SUBSTITUTERS}
    server, resolver = make_nix(index=index, **nix)
    assert resolver.nix_build is not None
    roots = Path(server.config.storage) / "nix-roots"
    for name in ("pkgs.inner", "demo/pkgs.deeper.x"):
        r = server.request("GET", f"/v2/{name}/manifests/latest")
        assert r.status == 404 and r.code == "MANIFEST_UNKNOWN", r.body
        assert 'nix_build_allow = ["*"]' in message(r) and "pkgs." in message(r)
    assert resolver.nix_build.runs == 0 and not roots.exists()
    # top-level attributes are built; dotted index keys are served (never built)
    assert server.request("GET", "/v2/tool/manifests/latest").status == 200
    assert server.request("GET", "/v2/py.requests/manifests/latest").status == 200
    assert resolver.nix_build.runs == 1

    one_level, _ = make_nix(index=index, nix_build_allow=("*", "pkgs.*"), **nix)
    assert one_level.request("GET", "/v2/pkgs.inner/manifests/latest").status == 200
    r = one_level.request("GET", "/v2/pkgs.deeper.x/manifests/latest")
    assert r.status == 404 and '"pkgs.*"' in message(r)
    # names the config itself lists (meta members, always) are the operator's choice
    meta, _ = make_nix(index=index, meta={"deep": ("pkgs.deeper.x",)}, **nix)
    assert meta.request("GET", "/v2/deep/manifests/latest").status == 200
    anything, _ = make_nix(index=index, nix_build_allow=("pkgs.**",), **nix)
    assert anything.request("GET", "/v2/pkgs.deeper.x/manifests/latest").status == 200
    assert anything.request("GET", "/v2/tool/manifests/latest").status == 404


def test_attribute_path_patterns() -> None:
    nb = NixBuild("<nixpkgs>", Path("/nonexistent"), allow=("*", "python3packages.*", "a.**.z"))
    assert nb.permits("hello") and nb.permits("python3packages.requests")
    assert not nb.permits("python3packages.requests.src") and not nb.permits("pkgs.hello")
    assert nb.permits("a.b.z") and nb.permits("a.b.c.z") and not nb.permits("a.z")
    assert not NixBuild("x", Path("/x"), allow=()).permits("hello")
    with pytest.raises(ValueError, match="whole segment"):
        NixBuild("x", Path("/x"), allow=("a**",))


def test_a_storm_of_builds_is_bounded_and_index_names_do_not_wait(
    make_nix: MakeNix,  # noqa: F811
    demo_index: Path,  # noqa: F811
    demo_closure: list[str],
    tmp_path: Path,
) -> None:
    expr = write_expr(tmp_path)
    server, resolver = make_nix(
        index=demo_index,
        nix_build=True,
        nix_expr=str(expr),
        nix_build_args=NO_SUBSTITUTERS,
        nix_build_jobs=2,
        nix_build_queue=3,
    )
    nix = resolver.nix_build
    assert nix is not None
    pool = ThreadPoolExecutor(16)
    try:
        storm: list[Future[Reply]] = []
        # slow0 asked for by three images at once: one nix-build
        for name in ("slow0", "demo/slow0", "busybox/slow0"):
            storm.append(pool.submit(server.request, "GET", f"/v2/{name}/manifests/latest"))
        for i in range(1, 5):
            storm.append(pool.submit(server.request, "GET", f"/v2/slow{i}/manifests/latest"))
        deadline = time.monotonic() + 10
        while (resolver.builds_admitted < 5 or nix.runs < 2) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert resolver.builds_admitted == 5 and nix.runs == 2  # 2 running, 3 queued

        # full: a new name is refused at once, without queueing
        r, took = timed_get(server, "slow5")
        assert r.status == 429 and r.code == "TOOMANYREQUESTS", r.body
        assert "nix_build_jobs + nix_build_queue = 5" in message(r) and took < 1
        # a name already building is joined, not refused
        storm.append(pool.submit(server.request, "GET", "/v2/greeting/slow4/manifests/latest"))
        # index names and store/ names compose meanwhile, in their own pool
        r, took = timed_get(server, "demo/greeting")
        assert r.status == 200 and took < SLEEP - 0.5, (r.body, took)
        busybox = demo_packages(demo_closure)["busybox"]
        r, took = timed_get(server, f"store/{hash_of(busybox)}")
        assert r.status == 200 and took < SLEEP - 0.5, (r.body, took)

        replies = [f.result(60) for f in storm]
        assert [r.status for r in replies] == [200] * len(replies), [r.body for r in replies]
        assert nix.runs == 5 and resolver.builds_admitted == 0
        assert resolver.builds_refused == 1
        # the capacity is back
        assert server.request("GET", "/v2/tool/manifests/latest").status == 200
    finally:
        pool.shutdown(wait=True)


def test_per_name_caches_are_bounded(tmp_path: Path) -> None:
    expr = write_expr(tmp_path)
    nb = NixBuild(str(expr), tmp_path / "roots", NO_SUBSTITUTERS, cache_size=3)
    for i in range(8):
        assert nb.build(f"nosuch{i}") is None
        assert nb.build(f"t{i}") is not None
    assert len(nb._known) == 3 and len(nb._failed) == 3
    runs = nb.runs
    assert nb.build("t7") is not None and nb.build("nosuch7") is None
    assert nb.runs == runs  # the most recent names are still remembered
    assert nb.build("t0") is not None and nb.runs == runs + 1  # the oldest were evicted
    with pytest.raises(NixBuildError, match="failed"):
        nb.build("broken")
    with pytest.raises(NixBuildError, match="failed"):
        nb.build("broken")
    assert nb.runs == runs + 2


def test_bounded_cache_evicts_the_least_recently_used_and_expires() -> None:
    now = [0.0]
    cache: BoundedCache[str, int] = BoundedCache(2, ttl=10, clock=lambda: now[0])
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and len(cache) == 2
    now[0] = 10.0
    assert cache.get("a") is None and cache.get("c") is None and len(cache) == 0


def test_nix_build_options_are_checked() -> None:
    nix = config_from_dict(
        {
            "nix": {
                "nix_build_allow": ["*", "python3packages.*"],
                "nix_build_jobs": 1,
                "nix_build_queue": 0,
                "nix_build_failure_ttl": 0.5,
            }
        }
    ).nix
    assert nix.nix_build_allow == ("*", "python3packages.*") and nix.nix_build_queue == 0
    assert config_from_dict({}).nix.nix_build_failure_ttl == 60
    for bad, match in [
        ({"nix_build_jobs": 0}, "nix_build_jobs must be at least 1"),
        ({"nix_build_queue": -1}, "nix_build_queue must not be negative"),
        ({"nix_build_failure_ttl": 0}, "nix_build_failure_ttl must be a positive"),
        ({"nix_build_failure_ttl": "1m"}, "wrong type"),
        ({"nix_build_allow": ["pkgs..x"]}, "empty attribute-path segment"),
        ({"nix_build_allow": "*"}, "wrong type"),
    ]:
        with pytest.raises(RegistryConfigError, match=match):
            config_from_dict({"nix": bad})
