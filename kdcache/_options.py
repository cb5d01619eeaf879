"""What every `kdcache` command shares: the net that turns errors into one line, URL checks
while options parse, --storage-option and its parsing, and the help of shared flags.

Light on purpose (click only at import): `kdcache --help` loads this for every command.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def friendly_errors(fn: F) -> F:
    """Turn kdcache's own errors, and a disk or store failing where kdcache did not wrap it
    (OSError, botocore, aiohttp), into one clear line, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from schemas.errors import KdcacheError, one_line
        from schemas.storage import storage_failures

        try:
            return fn(*args, **kwargs)
        except KdcacheError as exc:
            raise click.ClickException(str(exc)) from None
        except storage_failures() as exc:
            if isinstance(exc, OSError):  # names its own path
                raise click.ClickException(one_line(str(exc))) from None
            # A store's client failing inside another library's call (zarr's reads, s3fs's
            # listings) after every retry: its text names no cache, so name the command's.
            text = one_line(f"{type(exc).__name__}: {exc}")
            url = _command_url()
            where = (
                f"{url}: the storage failed while `kdcache {_command_name()}` ran on it: "
                if url
                else ""
            )
            raise click.ClickException(
                f"{where}{text}. Fix: check that the store is reachable and not throttling, "
                "then re-run (a build resumes from its last committed shard)"
            ) from None

    return wrapper  # type: ignore[return-value]


_URL_PARAMS = ("cache", "out", "out_train")
"""The parameters that name the cache a command reads or writes: `train` reads --cache and
writes its run to --out, `build` writes --out; the first one set is named."""


def _command_url() -> str | None:
    from schemas.storage import shown

    ctx = click.get_current_context(silent=True)
    for name in _URL_PARAMS:
        value = ctx.params.get(name) if ctx is not None else None
        if isinstance(value, str) and value:
            return shown(value)
    return None


def _command_name() -> str:
    ctx = click.get_current_context(silent=True)
    return ctx.info_name if ctx is not None and ctx.info_name else "command"


def cache_url(option: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback that refuses a URL whose scheme fsspec cannot open, naming `option`,
    while the options are parsed: before a build reads its dataset or a train loads torch."""

    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        from schemas.errors import KdcacheError
        from schemas.storage import check_url

        try:
            if value is not None:
                check_url(value, option)
        except KdcacheError as exc:
            raise click.ClickException(str(exc)) from None
        return value

    return check


BREAK_LOCK_HELP = (
    "Take the output's lock (lock.json) even from a writer that looks alive: only when it is "
    "dead (killed, its machine lost). A lock whose heartbeat is older than its stale time "
    "(300 s, or KDCACHE_LOCK_STALE_SECONDS; a live writer renews it every tenth of that) is "
    "taken over without this."
)


def storage_option(fn: F) -> F:
    """`--storage-option KEY=VALUE` (repeatable), handed to fsspec for every URL a command
    opens."""
    return click.option(
        "--storage-option",
        "storage_option",
        multiple=True,
        metavar="KEY=VALUE",
        help="fsspec option for the cache's storage, repeatable: a dotted KEY nests "
        "(client_kwargs.endpoint_url=http://127.0.0.1:9000), a VALUE that reads as JSON "
        "(true, 3, {...}) is taken as such. Credentials given here never reach a manifest.",
    )(fn)


def parse_storage_options(pairs: tuple[str, ...]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, text in parse_key_values(pairs, "--storage-option").items():
        try:
            value: Any = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.split(".")
        node = options
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise click.BadParameter(
                    f"{key!r} nests under {part!r}, which is already set to a value",
                    param_hint="--storage-option",
                )
            node = child
        node[leaf] = value
    return options


def parse_key_values(pairs: tuple[str, ...], option: str = "--loss-option") -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint=option)
        out[key.strip()] = value.strip()
    return out


OVERWRITE_HELP = (
    "Replace a cache at the output made with other settings, or write into a non-empty "
    "directory that holds no cache."
)
