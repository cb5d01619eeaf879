"""Retries with exponential backoff for the object-store operations kdcache issues itself.

s3fs and botocore already retry each request (botocore: 5xx, throttling and dropped
connections, up to `max_attempts`; s3fs: SlowDown and broken reads). What they cannot cover is
a burst longer than their budget, and errors that surface outside their loop: a body that keeps
breaking mid-transfer ends as aiohttp's `ClientPayloadError`, a 500 that outlasts botocore's
attempts as an `OSError`. Our own operations are idempotent (a whole object put, a read, a
server-side copy, a delete), so `retrying` runs each again, after a growing, jittered pause, a
bounded number of times: `KDCACHE_STORAGE_RETRIES` (default `DEFAULT_RETRIES`) retries, 0 to
turn them off. Only transient failures are retried: 5xx answers, throttling (429 and the
throttling codes of S3-like stores), dropped or timed-out connections. A `KdcacheError` (a
size or checksum that is wrong is wrong every time), a missing file, a refused permission and
every other 4xx fail at once. Local filesystems are never retried: a full or failing disk does
not heal in seconds. When the budget is spent the failure becomes one `StorageError` naming the
URL and the number of attempts.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from fsspec import AbstractFileSystem

from schemas.errors import ConfigError, KdcacheError, StorageError

T = TypeVar("T")
log = logging.getLogger("kdcache.storage")

RETRIES_ENV = "KDCACHE_STORAGE_RETRIES"
DEFAULT_RETRIES = 3
"""Retries after the first attempt: with botocore's own five attempts per request underneath,
four rounds outlast a store that throttles or restarts for a few seconds."""
MAX_RETRIES = 20
BASE_DELAY = 0.5
"""Seconds before the first retry; each later pause doubles, up to `MAX_DELAY`."""
MAX_DELAY = 8.0

_THROTTLING = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "BandwidthLimitExceeded",
        "ProvisionedThroughputExceededException",
    }
)
"""Error codes S3-like stores use for "slow down", whatever the HTTP status (often 400/503)."""
_NOT_TRANSIENT = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


def storage_retries() -> int:
    """The retry budget: `KDCACHE_STORAGE_RETRIES` when set, else `DEFAULT_RETRIES`."""
    text = os.environ.get(RETRIES_ENV, "").strip()
    if not text:
        return DEFAULT_RETRIES
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_RETRIES:
        raise ConfigError(
            f"{RETRIES_ENV}={text[:20]!r} is not a whole number in [0, {MAX_RETRIES}]",
            hint=f"set it to the retries wanted after a storage operation fails (default {DEFAULT_RETRIES})",
        )
    return value


def backoff(attempt: int) -> float:
    """The pause before retry number `attempt` + 1: BASE_DELAY * 2**attempt, capped at
    MAX_DELAY, times a random factor in [0.5, 1] so that ranks hit by the same fault spread out."""
    return min(MAX_DELAY, BASE_DELAY * 2**attempt) * random.uniform(0.5, 1.0)


def transient(exc: BaseException) -> bool:
    """Whether `exc` is a failure that trying again may cure (see the module docstring)."""
    if isinstance(exc, (KdcacheError, *_NOT_TRANSIENT)):
        return False
    for link in _chain(exc):
        status, code = _http_answer(link)
        if status is not None:  # the store answered: its status decides
            return status >= 500 or status == 429 or code in _THROTTLING
    if any(isinstance(link, ssl.SSLError) for link in _chain(exc)):
        return False  # a certificate that fails will fail again
    return any(isinstance(link, _connection_failures()) for link in _chain(exc))


def retrying(
    fs: AbstractFileSystem,
    path: str,
    doing: str,
    operation: Callable[[], T],
    *,
    retries: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """`operation()`, run again after a transient failure on an object store, at most
    `retries` more times (None: `storage_retries()`); on a local filesystem, run once.

    `operation` must be idempotent. Between attempts the filesystem's listing cache for `path`
    is dropped (a failed attempt may have changed what is there). When every attempt failed,
    raises `StorageError` naming `path`'s URL, `doing` and the last error; an error that is not
    transient propagates unchanged from the attempt that met it.
    """
    from schemas.storage import is_local, shown

    if is_local(fs):
        return operation()
    budget = storage_retries() if retries is None else retries
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return operation()
        except Exception as exc:
            if not transient(exc):
                raise
            url = shown(fs.unstrip_protocol(path))
            if attempt >= budget:
                raise StorageError(
                    f"{url}: the storage kept failing while {doing} ({_attempts(attempt + 1)} in "
                    f"{time.monotonic() - started:.1f} s; last: {type(exc).__name__}: {_brief(exc)})",
                    hint="check that the store is reachable and not throttling, then re-run (a build "
                    f"resumes from its last committed shard); {RETRIES_ENV} sets the retries",
                ) from exc
            pause = backoff(attempt)
            log.warning(
                "kdcache: %s failed while %s (%s); retry %d of %d in %.1f s",
                url,
                doing,
                type(exc).__name__,
                attempt + 1,
                budget,
                pause,
            )
            fs.invalidate_cache(path)
            sleep(pause)
            attempt += 1


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc` and the exceptions it was raised from or during (s3fs keeps the ClientError as
    the cause of the OSError it raises)."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def _http_answer(exc: BaseException) -> tuple[int | None, str | None]:
    """(HTTP status, error code) when `exc` carries a store's answer, else (None, None)."""
    response = getattr(exc, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        meta = response.get("ResponseMetadata") or {}
        error = response.get("Error") or {}
        status = meta.get("HTTPStatusCode")
        code = error.get("Code")
        if isinstance(status, int):
            return status, code if isinstance(code, str) else None
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(exc, aiohttp.ClientResponseError):
        return exc.status, None
    return None, None


def _connection_failures() -> tuple[type[BaseException], ...]:
    """Exception types of a connection that dropped, broke mid-body or timed out. Those of
    botocore, aiohttp and urllib3 are looked up only when a filesystem imported them."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    if (botocore := sys.modules.get("botocore.exceptions")) is not None:
        kinds += [botocore.HTTPClientError, botocore.ResponseStreamingError]
        kinds += [botocore.IncompleteReadError, botocore.ConnectionError]
    if (aiohttp := sys.modules.get("aiohttp")) is not None:
        kinds += [aiohttp.ClientPayloadError, aiohttp.ClientConnectionError]
    if (urllib3 := sys.modules.get("urllib3.exceptions")) is not None:
        kinds += [urllib3.ProtocolError, urllib3.TimeoutError]
    return tuple(kinds)


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"
