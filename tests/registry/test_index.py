"""`stowaway index`: package indexes from real nix-env output, a real binary cache
and result links; atomic writes; the live IndexFile."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from nixtools import SANDBOXED_MK, nix_copy
from stowaway.cli import main
from stowaway.registry.package_index import IndexFile, PackageIndexError, load_index

TOOLS = f"""let mk = name: {SANDBOXED_MK} name "echo ${{name}} > $out"; in {{
  tool = mk "tool-1.2"; toolOld = mk "tool-1.10"; toolPre = mk "tool-1.10pre1";
  plain = mk "greeting-data";
  pythonPackages = {{ Requests = mk "requests-2.0"; }};
}}
"""


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory, have_nix: None) -> dict[str, str]:
    """attr → store path of small real derivations with versions."""
    d = tmp_path_factory.mktemp("tools")
    (d / "tools.nix").write_text(TOOLS)
    out = {}
    for attr in ("tool", "toolOld", "toolPre", "plain", "pythonPackages.Requests"):
        out[attr] = subprocess.run(
            ["nix-build", str(d / "tools.nix"), "-A", attr, "--no-out-link",
             "--option", "substituters", ""],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    return out


def run(*args: str, input: bytes | None = None) -> str:
    result = CliRunner().invoke(main, ["index", *args], input=input)
    assert result.exit_code == 0, result.output
    return result.output


def fail(*args: str) -> str:
    result = CliRunner().invoke(main, ["index", *args])
    assert result.exit_code != 0
    return result.output


def test_from_nix_env_json(tmp_path: Path, tools: dict[str, str]) -> None:
    expr = tmp_path / "tools.nix"
    expr.write_text(TOOLS)
    listing = subprocess.run(
        ["nix-env", "-f", str(expr), "-qaP", "--out-path", "--json"],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    out = tmp_path / "index.json"
    run("-o", str(out), "--from-nix-env", "-", input=listing)
    index = load_index(out)
    assert index.lookup("tool") == tools["tool"]
    assert index.lookup("toolOld") == tools["toolOld"]
    assert index.lookup("toolold") == tools["toolOld"]  # lower-case alias for pull names
    assert index.packages["tool"].meta == {"name": "tool-1.2", "version": "1.2"}
    # the same input gives the same bytes
    again = tmp_path / "again.json"
    run("-o", str(again), "--from-nix-env", "-", input=listing)
    assert again.read_bytes() == out.read_bytes()
    assert "tools.nix: not JSON" in fail("-o", str(out), "--from-nix-env", str(expr))
    (tmp_path / "bad.json").write_text('{"x": {"name": "x"}}')
    assert "'x': no \"outputs\"" in fail(
        "-o", str(out), "--from-nix-env", str(tmp_path / "bad.json")
    )


def test_from_binary_cache_newest_version_wins(tmp_path: Path, tools: dict[str, str]) -> None:
    cache = nix_copy(tmp_path / "cache", list(tools.values()), "xz", None)
    out = tmp_path / "index.json"
    paths = tmp_path / "paths.txt"
    paths.write_text("\n".join(reversed(list(tools.values()))) + "\n")
    run("-o", str(out), "--from-cache", cache, "--no-require-sigs", "--paths-from", str(paths))
    index = load_index(out)
    assert index.lookup("tool") == tools["toolOld"]  # 1.10 > 1.10pre1 > 1.2
    assert index.packages["tool"].meta == {"version": "1.10"}
    assert index.lookup("greeting-data") == tools["plain"]
    assert index.lookup("requests") == tools["pythonPackages.Requests"]
    assert sorted(index.packages) == ["greeting-data", "requests", "tool"]
    # signatures are checked as in the composer
    msg = fail("-o", str(out), "--from-cache", cache, tools["tool"])
    assert "no valid signature" in msg
    missing = "/nix/store/" + "0" * 32 + "-gone-1.0"
    msg = fail("-o", str(out), "--from-cache", cache, "--no-require-sigs", missing)
    assert f"{missing} is not in binary cache" in msg


def test_from_result_links(tmp_path: Path, demo_closure: list[str]) -> None:
    links = tmp_path / "links"
    links.mkdir()
    app = demo_closure[-1]
    (links / "demo").symlink_to(app)
    (links / "busybox").symlink_to(demo_closure[0] + "/bin/busybox")  # below a store path
    (links / ".hidden").write_text("ignored")
    out = tmp_path / "index.json"
    run("-o", str(out), "--from-links", str(links))
    index = load_index(out)
    assert index.lookup("demo") == app and index.lookup("busybox") == demo_closure[0]
    (links / "stray").symlink_to("/etc/hostname")
    before = out.read_bytes()
    assert "stray -> /etc/hostname" in fail("-o", str(out), "--from-links", str(links))
    assert out.read_bytes() == before  # a failed run leaves the old index untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".index.json")]


def test_exactly_one_source(tmp_path: Path) -> None:
    assert "exactly one of" in fail("-o", str(tmp_path / "x.json"))
    assert "only read with --from-cache" in fail(
        "-o", str(tmp_path / "x.json"), "--from-links", str(tmp_path), "/nix/store/x"
    )


def test_index_file_reloads_on_change(tmp_path: Path, demo_closure: list[str]) -> None:
    path = tmp_path / "index.json"
    path.write_text(json.dumps({"packages": {"a": demo_closure[0]}}))
    live = IndexFile(path)
    assert live.get().lookup("a") == demo_closure[0]
    assert live.current() is not None
    path.write_text(json.dumps({"packages": {"a": demo_closure[1]}}))
    os.utime(path, ns=(1, 1))  # even with a clock that did not move, the stamp changed
    assert live.current() is None
    assert live.get().lookup("a") == demo_closure[1]
    broken = IndexFile(tmp_path / "missing.json")
    with pytest.raises(PackageIndexError, match="missing.json"):
        broken.get()
