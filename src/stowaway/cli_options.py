"""Click options and error reporting shared by ``stowaway``'s commands and the faces'
own command modules (registered lazily by ``stowaway.cli``), which import them from
here rather than from ``stowaway.cli``: the top-level command imports the faces.

Every command is a ``StowawayCommand`` (or sits in a ``StowawayGroup``): it raises
``StowawayError`` and ``report`` is the one way an error reaches the user."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from stowaway.errors import StowawayError

if TYPE_CHECKING:
    from stowaway.distribution.credentials import CredentialsLookup
    from stowaway.image.config import ImageOptions

F = TypeVar("F", bound=Callable[..., Any])


def option_group(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several click decorators as one, in the order they read (click adds options
    bottom-up, so they are applied in reverse)."""

    def apply(f: F) -> F:
        for d in reversed(decorators):
            f = d(f)
        return f

    return apply


def report(err: StowawayError, *, as_json: bool = False) -> NoReturn:
    """The one way a command reports an error: ``error: MESSAGE`` and, when there is one,
    ``  hint: HINT`` on stderr; with ``as_json`` (the command's --json) also the object
    ``{"error": MESSAGE, "hint": HINT-or-null}`` on stdout; exit status 1."""
    click.echo(f"error: {err.message}", err=True)
    if err.hint:
        click.echo(f"  hint: {err.hint}", err=True)
    if as_json:
        click.echo(json.dumps({"error": err.message, "hint": err.hint}))
    raise click.exceptions.Exit(1)


#: Set to 1 to see the traceback of an internal error (a bug) instead of one line.
DEBUG_ENV = "STOWAWAY_DEBUG"
#: Exit status after Ctrl-C (SIGINT), as shells report it: 128 + 2.
INTERRUPTED_STATUS = 130


def internal_error(err: BaseException) -> StowawayError:
    """The one-line report of an unexpected exception (a bug)."""
    text = str(err).strip().splitlines()
    detail = f": {text[0]}" if text else ""
    return StowawayError(
        f"internal error: {type(err).__name__}{detail}",
        hint=f"this is a bug in stowaway; please report it with the command line "
        f"(rerun with {DEBUG_ENV}=1 for the traceback)",
    )


class StowawayCommand(click.Command):
    """A click command whose ``StowawayError`` goes to ``report`` (with --json when the
    command has it and was given it). Ctrl-C prints ``interrupted`` and exits 130
    (cleanup runs first: ``finally`` blocks, temp files removed); any other exception
    is a bug, reported the same way as ``internal error: TYPE: message`` with a hint to
    report it, and raised with its traceback only when $STOWAWAY_DEBUG is 1."""

    def invoke(self, ctx: click.Context) -> Any:
        import os

        as_json = bool(ctx.params.get("as_json"))
        try:
            return super().invoke(ctx)
        except StowawayError as err:
            report(err, as_json=as_json)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            if as_json:
                click.echo(json.dumps({"error": "interrupted", "hint": None}))
            raise click.exceptions.Exit(INTERRUPTED_STATUS) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            report(internal_error(err), as_json=as_json)


class StowawayGroup(click.Group):
    """A click group whose subcommands are ``StowawayCommand``s."""

    command_class = StowawayCommand


#: --argstr NAME VALUE for commands that evaluate a FILE.nix (`build -f`, `plan -f`,
#: `buildkit context`), as nix-build has it.
argstr_option = click.option(
    "--argstr",
    "argstrs",
    nargs=2,
    multiple=True,
    metavar="NAME VALUE",
    help="Pass a string argument to FILE.nix (as nix-build --argstr); repeatable.",
)

#: --arg NAME EXPR: a Nix expression as an argument of FILE.nix, as nix-build has it.
arg_option = click.option(
    "--arg",
    "nix_args",
    nargs=2,
    multiple=True,
    metavar="NAME EXPR",
    help="Pass a Nix expression as an argument to FILE.nix (as nix-build --arg); repeatable.",
)


#: --substituter and --trusted-public-key: the binary caches missing store paths
#: come from (`build`, `plan`, `snapshotter`, `cri-image-service`).
cache_options = option_group(
    click.option(
        "--substituter",
        "substituters",
        multiple=True,
        metavar="URL",
        help="Binary cache (file:// or http(s)://) to take missing paths from; "
        "repeatable, in priority order.",
    ),
    click.option(
        "--trusted-public-key",
        "trusted_keys",
        multiple=True,
        metavar="NAME:BASE64",
        help="Key whose signatures are accepted on binary cache paths; repeatable.",
    ),
)


#: Flags that choose where store paths come from (shared by several commands).
store_options = option_group(
    click.option(
        "--store",
        metavar="DIR",
        help="Read store paths from DIR (e.g. a SAN mount of /nix/store) instead of /nix/store.",
    ),
    cache_options,
    click.option(
        "--no-require-sigs",
        is_flag=True,
        help="Accept unsigned binary cache paths (trust the transport instead).",
    ),
)


layering_options = option_group(
    click.option(
        "--max-layers",
        default=100,
        show_default=True,
        type=int,
        help="Most layers in the image, the customisation layer included (≤ 125).",
    ),
    click.option(
        "--layering",
        type=click.Choice(["auto", "popularity", "dominator"]),
        default="auto",
        show_default=True,
        help="auto: stable groups for reuse across versions and images; "
        "popularity: nixpkgs' popularity contest; dominator: Nixery's grouping.",
    ),
)


#: --layer-base INSTALLABLE (`build`, `plan`): a base planned apart, at the bottom.
layer_base_option = click.option(
    "--layer-base",
    "layer_base",
    multiple=True,
    metavar="INSTALLABLE",
    help="Plan this package's closure (e.g. the runtime the image is built over) on its "
    "own, in the bottom layers: every image naming the same base shares those layers "
    "(same --layering and --max-layers); repeatable. It must be in the image's closure.",
)


#: The image-config flags shared by `build` and `buildkit context`.
image_flags = option_group(
    click.option(
        "--entrypoint", default=None, help='JSON array or shell words, e.g. "/bin/app -v".'
    ),
    click.option("--cmd", default=None, help="Default arguments (JSON array or shell words)."),
    click.option("--env", "env", multiple=True, metavar="K=V", help="Environment; repeatable."),
    click.option("--workdir", default=None),
    click.option(
        "--user",
        default=None,
        help="NAME, UID or UID:GID; added to /etc/passwd (a NAME gets uid 1000, "
        "nobody 65534:65534).",
    ),
    click.option(
        "--expose", multiple=True, metavar="PORT[/PROTO]", help="Exposed port; repeatable."
    ),
    click.option(
        "--label", "labels", multiple=True, metavar="K=V", help="Image label; repeatable."
    ),
    click.option(
        "--created",
        default=None,
        help="Creation time: epoch seconds, RFC 3339 (UTC without an offset) or 'now' "
        "(default: epoch 1).",
    ),
    click.option(
        "--chown",
        "chown",
        multiple=True,
        metavar="REGEX=UID:GID",
        help="Owner of the files whose whole absolute path matches REGEX, e.g. "
        "'^/nix/store/[^/]+-app/var(/.*)?$=1000:1000'; repeatable, first match wins.",
    ),
    click.option(
        "--chmod",
        "chmod",
        multiple=True,
        metavar="REGEX=MODE",
        help="Octal mode of the files (not symlinks) whose whole path matches REGEX; "
        "repeatable, first match wins.",
    ),
    click.option(
        "--mkdir",
        "mkdir",
        multiple=True,
        metavar="PATH[:UID:GID[:MODE]]",
        help="Make a directory, owned by --user unless ids are given (mode 0755), e.g. "
        "/var/lib/app; repeatable.",
    ),
    click.option(
        "--allow-setid",
        is_flag=True,
        help="Let --chmod/--mkdir modes set the setuid/setgid bits.",
    ),
)


#: --from BASE and how to reach a registry base: `build`'s base image options.
base_image_options = option_group(
    click.option(
        "--from",
        "base",
        default=None,
        metavar="BASE",
        help="Put the layers on top of this image: oci:DIR[:TAG], oci-archive:FILE[:TAG] "
        "or docker://HOST/REPO[:TAG|@DIGEST] (an index: this build's platform).",
    ),
    click.option(
        "--src-tls-verify",
        type=bool,
        default=True,
        show_default=True,
        help="For a docker:// base; false allows plain HTTP (loopback registries).",
    ),
    click.option(
        "--src-creds",
        default=None,
        metavar="USER[:PASS]",
        help="Credentials for a docker:// base (default: the login files or --authfile, "
        "never --creds).",
    ),
)


def image_options_from_flags(
    params: Mapping[str, Any], *, contents: Sequence[str] = ()
) -> ImageOptions:
    """ImageOptions from the values of the `image_flags` flags among a command's
    ``params`` (its click context's, which hold every flag it declares)."""
    from stowaway.image.config import ImageOptions, parse_created, parse_labels, parse_words
    from stowaway.image.ownership import parse_mkdir, rules_from

    entrypoint, cmd, created = params["entrypoint"], params["cmd"], params["created"]
    return ImageOptions(
        entrypoint=parse_words(entrypoint, "--entrypoint") if entrypoint is not None else None,
        cmd=parse_words(cmd, "--cmd") if cmd is not None else None,
        env=list(params["env"]),
        workdir=params["workdir"],
        user=params["user"],
        expose=list(params["expose"]),
        labels=parse_labels(params["labels"]),
        contents=list(contents),
        created=parse_created(created) if created is not None else 1,
        rules=rules_from(params["chown"], params["chmod"], allow_setid=params["allow_setid"]),
        mkdirs=[parse_mkdir(v, allow_setid=params["allow_setid"]) for v in params["mkdir"]],
    )


def registry_auth_options(*creds_aliases: str) -> Callable[[F], F]:
    """--creds (with ``creds_aliases``, e.g. build's --dest-creds) and --authfile: the
    options of every command that talks to a registry; read with
    ``credentials_from_flags``."""
    return option_group(
        click.option(
            "--creds",
            *creds_aliases,
            "creds",
            default=None,
            metavar="USER[:PASS]",
            help="Registry credentials; with USER alone the password is read from stdin "
            "(or asked for on a terminal). Default: the podman/docker login files.",
        ),
        click.option(
            "--authfile",
            default=None,
            metavar="FILE",
            help="Read credentials from this auth.json (podman's format, or docker's "
            "config.json) only; default $REGISTRY_AUTH_FILE, else containers' auth.json "
            "and ~/.docker/config.json.",
        ),
    )


def credentials_from_flags(creds: str | None, authfile: str | None) -> CredentialsLookup:
    """What --creds and --authfile say: explicit credentials (the password from stdin,
    or a prompt on a terminal, when --creds names only the user), or where to look."""
    from stowaway.distribution.credentials import Credentials, CredentialsLookup

    if creds is None:
        return CredentialsLookup(authfile=authfile)
    user, sep, password = creds.partition(":")
    if not user:
        raise StowawayError("--creds needs a user name", hint="--creds USER[:PASS]")
    if not sep:
        password = _read_password(user)
    return CredentialsLookup(Credentials(user, password, source="--creds"), authfile)


def _read_password(user: str) -> str:
    """The password of ``--creds USER``: all of stdin less its final newline (like
    ``docker login --password-stdin``), or a hidden prompt when stdin is a terminal."""
    import sys

    if sys.stdin is None:
        raise StowawayError(f"--creds {user}: no password and no stdin to read it from")
    if sys.stdin.isatty():
        password: str = click.prompt(f"Password for {user}", hide_input=True, err=True)
        return password
    text = sys.stdin.read()
    text = text[:-1] if text.endswith("\n") else text
    text = text[:-1] if text.endswith("\r") else text
    if not text:
        raise StowawayError(
            f"--creds {user}: no password on stdin",
            hint=f"pipe it in (`… | stowaway … --creds {user}`) or pass --creds USER:PASS",
        )
    return text
