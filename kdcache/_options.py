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
            text = f"{exc}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
            raise click.ClickException(one_line(text)) from None

    return wrapper  # type: ignore[return-value]


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
