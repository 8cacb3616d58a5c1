"""End-to-end tests of the `stowaway` command: real nix closures, real caches, real
containerd. These exercise the CLI as a user would, through a subprocess; the error
path is also checked in-process through the click commands themselves."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from daemons import Containerd, Registry
from stowaway.buildkit.cli_buildkit import buildkit_group
from stowaway.cli import LAZY_COMMANDS, main
from stowaway.cli_options import StowawayCommand, StowawayGroup
from stowaway_cli import build_json, run


def test_build_runs_in_private_containerd(demo_app: str, tmp_path: Path) -> None:
    archive = tmp_path / "demo.tar"
    out = build_json(
        demo_app,
        "--entrypoint",
        f"{demo_app}/bin/demo",
        "--cache-dir",
        str(tmp_path / "cache"),
        "-o",
        f"oci-archive:{archive}:v1",
    )
    assert out["manifest_digest"].startswith("sha256:")
    assert out["layers"][-1]["store_paths"] == []  # customisation layer last
    assert out["layers"][-2]["store_paths"] == [demo_app]  # the app alone on top
    with Containerd(tmp_path / "ctrd") as ctrd:
        ctrd.ctr("image", "import", "--base-name", "docker.io/library/demo", str(archive))
        ref = ctrd.ctr("image", "ls", "-q").stdout.split()[0]
        res = ctrd.ctr("run", "--rm", ref, "cli-demo")
    assert res.stdout.splitlines()[:1] == ["hello from stowaway"], (res.stdout, res.stderr)


def test_fresh_caches_give_same_digest_and_warm_build_reuses(demo_app: str, tmp_path: Path) -> None:
    args = [demo_app, "--entrypoint", f"{demo_app}/bin/demo", "--env", "A=1"]
    a = build_json(*args, "--cache-dir", str(tmp_path / "c1"), "-o", f"oci:{tmp_path}/a:t")
    one_at_a_time = ["--jobs", "1"]  # same bytes whatever the parallelism
    b = build_json(
        *args, *one_at_a_time, "--cache-dir", str(tmp_path / "c2"), "-o", f"oci:{tmp_path}/b:t"
    )
    assert a["manifest_digest"] == b["manifest_digest"]
    assert not any(layer["reused"] for layer in a["layers"])
    warm = build_json(*args, "--cache-dir", str(tmp_path / "c1"), "-o", f"oci:{tmp_path}/c:t")
    assert warm["manifest_digest"] == a["manifest_digest"]
    assert all(layer["reused"] for layer in warm["layers"])


def test_push_reports_layers_the_registry_had_as_reused(demo_app: str, tmp_path: Path) -> None:
    """The push record lives in the cache dir the CLI is given; a second push of the same
    image to another repo sends no layer (mounted from the first) and says so."""
    cache = tmp_path / "cache"
    with Registry(tmp_path / "reg") as reg:
        dest = ["--dest-tls-verify=false", "--cache-dir", str(cache)]
        first = build_json(demo_app, *dest, "-o", f"docker://{reg.host}/one:v1")
        assert not any(layer["reused"] for layer in first["layers"])
        assert (cache / "pushed" / f"127.0.0.1_{reg.port}.json").is_file()
        second = build_json(demo_app, *dest, "-o", f"docker://{reg.host}/two:v1")
    assert all(layer["reused"] for layer in second["layers"])
    assert second["sink"]["written"] == []
    assert {layer["digest"] for layer in second["layers"]} <= set(second["sink"]["linked"])


def test_binary_cache_only_gives_same_image_as_local_store(
    demo_app: str,
    demo_closure: list[str],
    signed_caches: dict[str, str],
    cache_keys: dict[str, str],
    tmp_path: Path,
) -> None:
    args = [demo_app, "--entrypoint", f"{demo_app}/bin/demo"]
    local = build_json(*args, "--cache-dir", str(tmp_path / "c1"), "-o", f"oci:{tmp_path}/a")
    empty = tmp_path / "empty-store"
    empty.mkdir()
    remote = build_json(
        *args,
        "--store",
        str(empty),
        "--substituter",
        signed_caches["zstd"],
        "--trusted-public-key",
        cache_keys["good"],
        "--cache-dir",
        str(tmp_path / "c2"),
        "-o",
        f"oci:{tmp_path}/b",
    )
    assert [x["diff_id"] for x in remote["layers"]] == [x["diff_id"] for x in local["layers"]]
    assert remote["manifest_digest"] == local["manifest_digest"]


def test_untrusted_cache_is_refused_with_the_flag_to_use(
    demo_app: str, signed_caches: dict[str, str], cache_keys: dict[str, str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty-store"
    empty.mkdir()
    proc = run(
        "build",
        demo_app,
        "--store",
        str(empty),
        "--substituter",
        signed_caches["xz"],
        "--trusted-public-key",
        cache_keys["other"],
        "-o",
        f"oci:{tmp_path}/x",
        ok=False,
    )
    assert proc.returncode == 1
    assert demo_app.split("/")[-1] in proc.stderr or "stowaway-demo-app" in proc.stderr
    assert "--trusted-public-key" in proc.stderr
    # the hint says the key given is not the signer's, naming both
    assert "the cache's signer is good-key-1, which none of the keys given matches" in proc.stderr
    assert cache_keys["other"] in proc.stderr


def test_plan_json_and_inspect_agree(
    demo_app: str, demo_closure: list[str], tmp_path: Path
) -> None:
    plan = json.loads(run("plan", demo_app, "--json").stdout)
    planned = [p for layer in plan["layers"] for p in layer["paths"]]
    assert sorted(planned) == sorted(demo_closure)
    assert plan["layers"][-1]["paths"] == [demo_app]
    run("build", demo_app, "--cache-dir", str(tmp_path / "c"), "-o", f"oci:{tmp_path}/img:t")
    summary = json.loads(run("inspect", f"oci:{tmp_path}/img:t", "--json").stdout)
    assert [layer["store_paths"] for layer in summary["layers"][:-1]] == [
        layer["paths"] for layer in plan["layers"]
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "ftp://x"], "oci:"),
        (["--max-layers", "200", "-o", "oci:/tmp/never"], "125"),
        (["--env", "NOEQUALS", "-o", "oci:/tmp/never"], "NOEQUALS"),
        (["--dest-creds", ":pw", "-o", "docker://127.0.0.1:1/x"], "needs a user name"),
        (["--jobs", "0", "-o", "oci:/tmp/never"], "--jobs"),
        (["--chown", "bad(=1:1", "-o", "oci:/tmp/never"], "invalid regular expression"),
        (["--chmod", "/x=4755", "-o", "oci:/tmp/never"], "--allow-setid"),
        (["--mkdir", "/var/../etc", "-o", "oci:/tmp/never"], "not normalised"),
        (["--chown", "/nowhere=1:1", "-o", "oci:/tmp/never"], "matches no file"),
    ],
)
def test_bad_flags_say_what_is_wrong(demo_app: str, args: list[str], message: str) -> None:
    proc = run("build", demo_app, *args, ok=False)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ownership_flags_reach_the_image(demo_app: str, tmp_path: Path) -> None:
    """--chown/--mkdir/--user nobody through the command line: the ruled layer goes on
    top of the store layers, the others are the plain build's."""
    base = [demo_app, "--user", "nobody", "--cache-dir", str(tmp_path / "c")]
    plain = build_json(*base, "-o", f"oci:{tmp_path}/a:t")
    rule = "/nix/store/[^/]+-greeting-data(/.*)?=1000:1000"
    out = build_json(*base, "--chown", rule, "--mkdir", "/var/lib/app", "-o", f"oci:{tmp_path}/b:t")
    store_rows = [row for row in out["layers"] if row["store_paths"]]
    assert store_rows[-1]["store_paths"][0].endswith("-greeting-data")
    assert store_rows[-1]["built"] and not any(row["built"] for row in store_rows[:-1])
    before = {row["digest"] for row in plain["layers"]}
    assert {row["digest"] for row in store_rows[:-1]} <= before
    assert out["layers"][-1]["digest"] not in before  # the customisation layer has the dir


def test_non_store_path_is_rejected(tmp_path: Path) -> None:
    proc = run("build", str(tmp_path), "-o", f"oci:{tmp_path}/x", ok=False)
    assert proc.returncode == 1
    assert "not a store path" in proc.stderr


def test_nix_file_installable(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    out = build_json(
        "-f",
        str(root / "fixtures" / "demo.nix"),
        "--cache-dir",
        str(tmp_path / "c"),
        "-o",
        f"oci:{tmp_path}/img",
    )
    assert out["layers"][-2]["store_paths"][0].endswith("-stowaway-demo-app")


def test_error_prints_message_and_hint_and_exits_1() -> None:
    result = CliRunner().invoke(main, ["plan"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "error: nothing to build",
        "  hint: name store paths, ./result links, flake references (.#app), or -f FILE.nix",
    ]
    assert result.stdout == ""
    assert "Traceback" not in result.output


def test_error_with_json_is_an_object_on_stdout() -> None:
    result = CliRunner().invoke(main, ["plan", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout) == {
        "error": "nothing to build",
        "hint": "name store paths, ./result links, flake references (.#app), or -f FILE.nix",
    }
    assert "  hint: name store paths" in result.stderr  # the lines for people stay
    assert "Traceback" not in result.output


def test_error_without_hint_has_null_hint_and_no_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", f"oci:{tmp_path}/missing", "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["error"] and "hint" in doc
    assert result.stderr.startswith("error: ")
    assert isinstance(result.exception, SystemExit)  # reported, not raised
    assert "Traceback" not in result.output


def test_every_command_reports_errors_the_one_way() -> None:
    ctx = click.Context(main)
    commands = {name: main.get_command(ctx, name) for name in main.list_commands(ctx)}
    assert set(LAZY_COMMANDS) <= set(commands)
    assert isinstance(main, StowawayGroup) and isinstance(buildkit_group, StowawayGroup)
    commands |= {f"buildkit {n}": c for n, c in buildkit_group.commands.items()}
    for name, command in commands.items():
        assert isinstance(command, StowawayCommand | StowawayGroup), name
