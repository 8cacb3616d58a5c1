"""The landing page suggests only pulls that work with the running configuration."""

from __future__ import annotations

from stowaway.registry.config import NixOptions
from stowaway.registry.landing import Rules, pull_examples, render_landing

SHELL = ("bashInteractive", "coreutils", "moreutils", "nano")


def test_no_index_suggests_store_names_only() -> None:
    """`stowaway serve` without --index: `shell/shell` (the old suggestion) cannot
    resolve, since the meta-package's members are index keys."""
    rules = Rules.of(NixOptions())
    commands, notes = pull_examples("h:5000", {"latest": ["shell"]}, rules)
    assert commands == ["docker pull h:5000/store/<32-char hash>[/<hash>...]"]
    assert any("stowaway index" in n for n in notes)
    page = render_landing("h:5000", {"latest": ["shell"]}, rules)
    assert "h:5000/shell" not in page and "h:5000/store/" in page


def test_meta_package_only_when_its_members_are_indexed() -> None:
    rules = Rules.of(NixOptions())
    partial = {"latest": ["shell", "coreutils", "git"]}  # as package_sets() gives it
    commands, notes = pull_examples("h", partial, rules)
    assert commands[0] == "docker pull h/coreutils" and "docker pull h/shell/" not in commands[1]
    assert any("need all their members" in n for n in notes)
    full = {"latest": ["shell", *SHELL, "git"]}
    commands, _ = pull_examples("h", full, rules)  # upper case is no repository name
    assert commands[:2] == ["docker pull h/coreutils", "docker pull h/shell/coreutils"]
    only_upper = {"latest": ["bashInteractive"]}
    assert pull_examples("h", only_upper, Rules.of(NixOptions(meta={})))[0][0] == (
        "docker pull h/bashinteractive"  # the index's lower-case alias
    )
    lower = {"latest": ["shell", "bashinteractive", "coreutils", "moreutils", "nano"]}
    assert "docker pull h/shell/bashinteractive" in pull_examples("h", lower, rules)[0]


def test_a_missing_always_package_rules_out_package_names() -> None:
    rules = Rules.of(NixOptions(always=("cacert",), meta={}))
    commands, notes = pull_examples("h", {"latest": ["git"], "stable": ["git", "cacert"]}, rules)
    assert commands[0] == "docker pull h/git:stable"  # latest lacks cacert
    assert any(":latest lacks the always-included cacert" in n for n in notes)


def test_nix_build_suggests_names_without_an_index() -> None:
    rules = Rules.of(NixOptions(nix_build=True))
    commands, notes = pull_examples("h", {"latest": ["shell"]}, rules)
    assert commands[:2] == ["docker pull h/hello", "docker pull h/shell/hello"]
    assert any("nix-build" in n for n in notes)


def test_plain_registry_says_push_then_pull() -> None:
    for rules in (Rules.of(None), Rules.of(NixOptions(enabled=False))):
        page = render_landing("h", {}, rules)
        assert "plain registry" in page and "store/" not in page and "skopeo copy" in page
