"""schemas._retry: which storage failures are tried again, how often and how far apart, and the
one line that is left when a store keeps failing; then the same through a real S3 server that
drops connections (tests/fixtures/faulty_s3.py)."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp
import fsspec
import pytest
from botocore.exceptions import ClientError, ConnectionClosedError
from s3fs.errors import translate_boto_error

from schemas import _retry
from schemas._retry import BASE_DELAY, DEFAULT_RETRIES, MAX_DELAY, retrying, storage_retries
from schemas.cache import open_cache
from schemas.errors import CacheCorruptError, ConfigError, StorageError
from schemas.storage import checksum_file, move_tree, read_bounded, resolve
from tests.fixtures.faulty_s3 import Fault, FaultyS3
from tests.schemas.test_cache import make_cache


def answer(status: int, code: str) -> ClientError:
    """What botocore raises for an S3 error response."""
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


def caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    "exc,expected",
    [
        (answer(500, "InternalError"), True),
        (answer(503, "SlowDown"), True),
        (answer(400, "Throttling"), True),  # throttling codes whatever the status
        (answer(429, "TooManyRequests"), True),
        (answer(404, "NoSuchKey"), False),
        (answer(403, "AccessDenied"), False),
        (answer(400, "InvalidArgument"), False),
        (answer(412, "PreconditionFailed"), False),
        (translate_boto_error(answer(500, "InternalError")), True),  # s3fs's OSError, its cause
        (translate_boto_error(answer(503, "SlowDown")), True),
        (translate_boto_error(answer(404, "NoSuchKey")), False),
        (translate_boto_error(answer(403, "AccessDenied")), False),
        (aiohttp.ClientPayloadError("Response payload is not completed"), True),
        (ConnectionClosedError(endpoint_url="http://127.0.0.1:1/b/k"), True),
        (ConnectionResetError(), True),
        (TimeoutError(), True),
        (FileNotFoundError("gone"), False),
        (PermissionError("no"), False),
        (ssl.SSLCertVerificationError("bad certificate"), False),
        (OSError(5, "ZSTD decompress failed"), False),  # what pyarrow raises for a bad shard
        (ValueError("bad"), False),
        (caused(CacheCorruptError("checksum"), ConnectionResetError()), False),
        (caused(FileNotFoundError("gone"), answer(500, "InternalError")), False),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v),
)
def test_what_is_transient(exc: BaseException, expected: bool) -> None:
    assert _retry.transient(exc) is expected


def failing(*errors: BaseException, result: Any = "done") -> Any:
    """An operation that raises `errors` one per call, then returns `result`."""
    calls: list[int] = []

    def operation(*args: Any) -> Any:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    operation.calls = calls  # type: ignore[attr-defined]
    return operation


def test_a_transient_failure_is_retried_after_growing_pauses() -> None:
    fs = fsspec.filesystem("memory")
    op = failing(ConnectionResetError(), answer(503, "SlowDown"), answer(500, "InternalError"))
    pauses: list[float] = []
    assert retrying(fs, "/b/k", "reading it", op, retries=3, sleep=pauses.append) == "done"
    assert len(op.calls) == 4 and len(pauses) == 3
    for attempt, pause in enumerate(pauses):
        cap = min(MAX_DELAY, BASE_DELAY * 2**attempt)
        assert cap / 2 <= pause <= cap


def test_backoff_doubles_up_to_its_cap() -> None:
    for attempt in range(12):
        cap = min(MAX_DELAY, BASE_DELAY * 2**attempt)
        assert cap / 2 <= _retry.backoff(attempt) <= cap
    assert _retry.backoff(30) <= MAX_DELAY


def test_a_store_that_keeps_failing_ends_in_one_line_naming_the_url() -> None:
    fs = fsspec.filesystem("memory")
    last = translate_boto_error(answer(500, "InternalError"))
    op = failing(*[ConnectionResetError("reset")] * 2, last)
    with pytest.raises(StorageError) as caught:
        retrying(fs, "/b/cache/commits/000001.json", "reading it", op, retries=2, sleep=no_pause)
    message = str(caught.value)
    assert message.startswith("memory:/b/cache/commits/000001.json: ") and "3 attempts" in message
    assert "reading it" in message and "\n" not in message and "KDCACHE_STORAGE_RETRIES" in message
    assert caught.value.__cause__ is last and len(op.calls) == 3


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("gone"),
        PermissionError("no"),
        answer(404, "NoSuchKey"),
        answer(400, "InvalidArgument"),
        CacheCorruptError("its checksum differs"),
        ValueError("a bug"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_other_errors_fail_at_once_unchanged(error: BaseException) -> None:
    fs = fsspec.filesystem("memory")
    op = failing(error)
    with pytest.raises(type(error)) as caught:
        retrying(fs, "/b/k", "reading it", op, retries=5, sleep=fail_if_called)
    assert caught.value is error and len(op.calls) == 1


def test_local_files_are_never_retried(tmp_path) -> None:
    fs, _ = resolve(str(tmp_path))
    op = failing(ConnectionResetError())
    with pytest.raises(ConnectionResetError):
        retrying(fs, str(tmp_path / "k"), "reading it", op, retries=5, sleep=fail_if_called)
    assert len(op.calls) == 1


def test_the_retries_knob(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_retry.RETRIES_ENV, raising=False)
    assert storage_retries() == DEFAULT_RETRIES
    monkeypatch.setenv(_retry.RETRIES_ENV, "0")
    op = failing(ConnectionResetError())
    with pytest.raises(StorageError, match="1 attempt in"):
        retrying(fsspec.filesystem("memory"), "/b/k", "reading it", op, sleep=fail_if_called)
    monkeypatch.setenv(_retry.RETRIES_ENV, " 7 ")
    assert storage_retries() == 7
    for bad in ("x", "-1", "99", "1.5"):
        monkeypatch.setenv(_retry.RETRIES_ENV, bad)
        with pytest.raises(ConfigError, match=_retry.RETRIES_ENV):
            storage_retries()


def test_a_move_retries_each_step_and_a_delete_whose_answer_was_lost(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe({"/mv/staging/s.zarr/a": b"a", "/mv/staging/s.zarr/b/c": b"c"})
    copy, rm = fs.copy, fs.rm
    copied = failing(ConnectionResetError("before copying"), result=None)
    removed: list[int] = []

    def copy_once_failing(*args: Any, **kwargs: Any) -> None:
        copied()
        copy(*args, **kwargs)

    def rm_answer_lost(*args: Any, **kwargs: Any) -> None:
        rm(*args, **kwargs)  # the store deleted them ...
        removed.append(1)
        if len(removed) == 1:
            raise ConnectionResetError("... and the answer was lost")

    monkeypatch.setattr(fs, "copy", copy_once_failing)
    monkeypatch.setattr(fs, "rm", rm_answer_lost)
    monkeypatch.setattr(_retry, "BASE_DELAY", 0.001)
    move_tree(fs, "/mv/staging/s.zarr", "/mv/shards/s.zarr")
    assert len(copied.calls) == 2  # the copy was tried again; the delete found nothing left
    assert fs.cat("/mv/shards/s.zarr/a") == b"a" and fs.cat("/mv/shards/s.zarr/b/c") == b"c"
    assert not fs.exists("/mv/staging/s.zarr/a")
    fs.rm("/mv", recursive=True)


def test_a_store_failing_inside_a_shard_read_is_not_a_damaged_shard(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_cache(str(tmp_path / "c"), "zarr")
    reader = open_cache(str(tmp_path / "c")).reader(0)
    monkeypatch.setattr(reader, "_read_stored", failing(ConnectionResetError("mid-read")))
    with pytest.raises(ConnectionResetError):  # `Cache` turns it into a StorageError
        reader.read_stored()
    monkeypatch.setattr(reader, "_read_stored", failing(OSError(5, "ZSTD decompress failed")))
    with pytest.raises(CacheCorruptError, match="cannot be decoded"):
        reader.read_stored()


def no_pause(seconds: float) -> None:
    assert 0 < seconds <= MAX_DELAY


def fail_if_called(seconds: float) -> None:
    raise AssertionError("retried an error that is not transient")


# -- through a store that drops connections ----------------------------------------------------


@pytest.fixture(scope="module")
def dropping(s3_options: dict[str, Any]) -> Any:
    """(s3fs filesystem through a fault proxy, the proxy), with a 1 MB object in place."""
    import s3fs

    proxy = FaultyS3(s3_options["client_kwargs"]["endpoint_url"])
    fs = s3fs.S3FileSystem(
        **{**s3_options, "client_kwargs": {"endpoint_url": proxy.url}}, skip_instance_cache=True
    )
    fs.mkdir("kdcache-retry")
    fs.pipe_file("kdcache-retry/blob", bytes(range(256)) * 4096)
    try:
        yield fs, proxy
    finally:
        proxy.close()


@pytest.mark.integration
def test_reads_get_through_more_broken_bodies_than_s3fs_retries(
    dropping: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3fs tries a broken read five times; kdcache's retries carry on past that."""
    fs, proxy = dropping
    monkeypatch.setattr(_retry, "BASE_DELAY", 0.01)
    proxy.schedule(Fault("get", "drop", times=7))
    assert read_bounded(fs, "kdcache-retry/blob", 1 << 21, root=None) == bytes(range(256)) * 4096
    assert proxy.faults[0].fired == 7
    proxy.schedule(Fault("get", "drop", times=7))
    assert checksum_file(fs, "kdcache-retry/blob")[1] == 1 << 20
    assert proxy.faults[0].fired == 7
    proxy.clear()


@pytest.mark.integration
def test_a_read_that_keeps_breaking_is_one_storage_error_naming_the_object(
    dropping: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, proxy = dropping
    monkeypatch.setattr(_retry, "BASE_DELAY", 0.01)
    monkeypatch.setenv(_retry.RETRIES_ENV, "1")
    proxy.schedule(Fault("get", "drop", times=None))
    with pytest.raises(StorageError, match="s3://kdcache-retry/blob: the storage kept failing"):
        read_bounded(fs, "kdcache-retry/blob", 1 << 21, root=None)
    proxy.clear()
