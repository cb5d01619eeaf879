"""A cache is untrusted input: no link or special file is followed or opened, no read goes past
a declared size, every declared number is bounded, and every refusal is one line."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import fsspec
import pytest
from fsspec.registry import known_implementations

from schemas._localfs import open_regular
from schemas.cache import Cache, CacheWriter, file_info, open_cache, read_manifest
from schemas.errors import (
    CacheCorruptError,
    CacheNotFoundError,
    ConfigError,
    KdcacheError,
    StorageError,
)
from schemas.manifest import TokenizerInfo, parse_manifest, to_json
from schemas.storage import checksum_file, resolve, storage_errors
from schemas.testing import random_records
from schemas.validate import validate_cache
from tests.schemas.test_cache import draft, make_cache

pytestmark = pytest.mark.reliability("hostile-cache")

FORMATS = ["arrow", "zarr"]
TOKENIZER = {"tokenizer.json": b'{"model": "tiny"}', "special_tokens_map.json": b"{}"}


def _shard(root: Path, fmt: str, index: int = 1) -> Path:
    return root / "shards" / f"{index:06d}.{fmt}"


def _inner_file(root: Path) -> Path:
    """The largest chunk file inside Zarr shard 1."""
    files = [p for p in _shard(root, "zarr").rglob("*") if p.is_file() and p.name != "zarr.json"]
    return max(files, key=lambda p: p.stat().st_size)


def _cache_with_tokenizer(url: str, fmt: str) -> None:
    """A small cache with a checksummed tokenizer/ copy."""
    base = draft(fmt)
    files = tuple(file_info(n, d) for n, d in sorted(TOKENIZER.items()))
    tokenizer = dataclasses.replace(base.tokenizer, files=files)
    writer = CacheWriter(url, dataclasses.replace(base, tokenizer=tokenizer))
    writer.store_tokenizer(TOKENIZER)
    for i in range(2):
        with writer.shard_writer(i) as w:
            w.write(random_records(writer.draft.layout, [5, 7], seed=i))
            writer.commit_shard(w)
    writer.finalize(2)


def _unchecked(url: str) -> Cache:
    """The cache as a reader that never went through open_cache's up-front scan would see it,
    so that each read path's own guard is what is tested."""
    fs, root = resolve(url)
    manifest = parse_manifest(json.loads(Path(root, "manifest.json").read_text()))
    return Cache(url, fs, root, manifest)


def _refused(exc: pytest.ExceptionInfo[KdcacheError], *needles: str) -> None:
    text = str(exc.value)
    assert "\n" not in text
    for needle in needles:
        assert needle in text, text


# -- links and special files ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_shard_linked_to_dev_zero_is_refused_before_reading(tmp_path, fmt) -> None:
    url = str(tmp_path / "c")
    make_cache(url, fmt)
    target = _shard(tmp_path / "c", fmt) if fmt == "arrow" else _inner_file(tmp_path / "c")
    target.unlink()
    target.symlink_to("/dev/zero")
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url)
    _refused(err, f"{target} is a symbolic link to '/dev/zero'", "Fix:")
    cache = _unchecked(url)
    for verify in (True, False):  # the checksum pass, and the memory map / LocalStore open
        with pytest.raises(CacheCorruptError) as err:
            cache.read_shard(1, verify=verify)
        _refused(err, f"{target} is a symbolic link")
    problems = validate_cache(url, deep=True)
    assert len(problems) == 1 and "symbolic link" in problems[0].what


@pytest.mark.parametrize("fmt", FORMATS)
def test_fifo_in_a_shard_is_refused_without_blocking(tmp_path, fmt) -> None:
    url = str(tmp_path / "c")
    make_cache(url, fmt)
    target = _shard(tmp_path / "c", fmt) if fmt == "arrow" else _inner_file(tmp_path / "c")
    target.unlink()
    os.mkfifo(target)
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url)
    _refused(err, f"{target} is a fifo")
    for verify in (True, False):
        with pytest.raises(CacheCorruptError) as err:
            _unchecked(url).read_shard(1, verify=verify)
        _refused(err, f"{target} is a fifo")


@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_folder_linked_elsewhere_is_refused(tmp_path, fmt) -> None:
    url = str(tmp_path / "c")
    make_cache(url, fmt)
    (tmp_path / "c" / "shards").rename(tmp_path / "elsewhere")
    (tmp_path / "c" / "shards").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url)
    _refused(err, "shards is a symbolic link")
    with pytest.raises(CacheCorruptError) as err:
        _unchecked(url).read_shard(0, verify=False)
    _refused(err, "shards is a symbolic link")


@pytest.mark.parametrize("fmt", FORMATS)
def test_manifest_linked_outside_is_refused(tmp_path, fmt) -> None:
    url = str(tmp_path / "c")
    make_cache(url, fmt)
    manifest = tmp_path / "c" / "manifest.json"
    manifest.rename(tmp_path / "outside.json")  # a valid manifest: only the link is wrong
    manifest.symlink_to(tmp_path / "outside.json")
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url)
    _refused(err, "manifest.json is a symbolic link")
    fs, root = resolve(url)
    with pytest.raises(CacheCorruptError) as err:
        read_manifest(fs, f"{root}/manifest.json")
    _refused(err, "manifest.json is a symbolic link")


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenizer_linked_outside_is_refused(tmp_path, fmt) -> None:
    url = str(tmp_path / "c")
    _cache_with_tokenizer(url, fmt)
    with open_cache(url).tokenizer_files() as folder:  # the honest copy reads
        assert sorted(os.listdir(folder)) == sorted(TOKENIZER)
    secret = tmp_path / "secret.json"
    secret.write_bytes(TOKENIZER["tokenizer.json"])  # same bytes: only the link is wrong
    (tmp_path / "c" / "tokenizer" / "tokenizer.json").unlink()
    (tmp_path / "c" / "tokenizer" / "tokenizer.json").symlink_to(secret)
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url)
    _refused(err, "tokenizer.json is a symbolic link")
    with pytest.raises(CacheCorruptError) as err, _unchecked(url).tokenizer_files():
        pass
    _refused(err, "tokenizer.json is a symbolic link")


def test_tokenizer_folder_linked_outside_is_refused(tmp_path) -> None:
    url = str(tmp_path / "c")
    _cache_with_tokenizer(url, "arrow")
    (tmp_path / "c" / "tokenizer").rename(tmp_path / "their-tokenizer")
    (tmp_path / "c" / "tokenizer").symlink_to(tmp_path / "their-tokenizer")
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url)
    _refused(err, "tokenizer is a symbolic link")
    with pytest.raises(CacheCorruptError) as err, _unchecked(url).tokenizer_files():
        pass
    _refused(err, "tokenizer is a symbolic link")


def test_commit_record_link_is_refused(tmp_path) -> None:
    url = str(tmp_path / "c")
    make_cache(url, shards=2, finalize=False)
    record = tmp_path / "c" / "commits" / "000001.json"
    record.rename(tmp_path / "record.json")
    record.symlink_to(tmp_path / "record.json")
    with pytest.raises(CacheCorruptError) as err:
        CacheWriter(url, draft()).committed()
    _refused(err, "000001.json is a symbolic link")


def test_open_regular_refuses_links_and_devices_by_itself(tmp_path) -> None:
    """The last guard, for a link put in place after the path was checked."""
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(CacheCorruptError) as err:
        open_regular(str(tmp_path / "link"))
    _refused(err, "link is a symbolic link")
    with pytest.raises(CacheCorruptError) as err:
        open_regular("/dev/zero")
    _refused(err, "/dev/zero is a character device")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        with pytest.raises(CacheCorruptError) as err:
            open_regular(str(tmp_path / "sock"))
    _refused(err, "sock is a socket")
    with open_regular(str(tmp_path / "real")) as f:
        assert f.read() == b"x"


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_root_itself_may_be_a_link(tmp_path, fmt) -> None:
    make_cache(str(tmp_path / "real"), fmt)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    cache = open_cache(str(tmp_path / "link"))
    assert cache.root == str(tmp_path / "real")  # resolved once
    assert validate_cache(str(tmp_path / "link"), deep=True) == []


# -- declared sizes ------------------------------------------------------------------------


def test_arrow_shard_of_another_size_is_refused_before_mapping(tmp_path) -> None:
    url = str(tmp_path / "c")
    make_cache(url, "arrow")
    shard = _shard(tmp_path / "c", "arrow")
    size = shard.stat().st_size
    with shard.open("ab") as f:
        f.write(b"\0" * 100)
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url).read_shard(1, verify=True)
    _refused(err, "larger than the manifest says", f"({size} bytes)")
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url).read_shard(1, verify=False)
    _refused(err, f"has {size + 100} bytes, the manifest says {size}")


def test_zarr_shard_with_more_bytes_than_declared_is_refused(tmp_path) -> None:
    url = str(tmp_path / "c")
    make_cache(url, "zarr")
    declared = open_cache(url).shards[1].nbytes
    (_shard(tmp_path / "c", "zarr") / "extra").write_bytes(b"x" * 10)
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url).read_shard(1, verify=True)
    _refused(err, "larger than the manifest says", f"({declared} bytes)")
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url).read_shard(1, verify=False)
    _refused(err, f"has {declared + 10} bytes, the manifest says {declared}")


def test_checksum_stops_reading_past_the_declared_size() -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/kdcache-test/big", b"\0" * (64 << 20))
    opened = []
    real_open = fs.open

    def spy(path, mode="rb", **kw):
        f = real_open(path, mode, **kw)
        opened.append(f)
        return f

    fs.open = spy
    try:
        with pytest.raises(CacheCorruptError, match="larger than the manifest says"):
            checksum_file(fs, "/kdcache-test/big", declared=10)
        assert opened[0].tell() <= 8 << 20  # at most one block, not 64 MiB
    finally:
        fs.rm("/kdcache-test", recursive=True)


def test_oversized_manifest_is_refused_and_says_the_limit(tmp_path) -> None:
    url = str(tmp_path / "c")
    make_cache(url)
    with open(tmp_path / "c" / "manifest.json", "r+b") as f:
        f.truncate((64 << 20) + 1)
    with pytest.raises(CacheCorruptError) as err:
        open_cache(url)
    _refused(err, "larger than 64 MiB")


def test_writer_refuses_a_manifest_readers_would_refuse(monkeypatch) -> None:
    monkeypatch.setattr("schemas.manifest.MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ConfigError, match="--shard-tokens"):
        to_json(draft())


def test_tokenizer_file_that_grew_is_read_no_further(tmp_path) -> None:
    url = str(tmp_path / "c")
    _cache_with_tokenizer(url, "arrow")
    with (tmp_path / "c" / "tokenizer" / "tokenizer.json").open("ab") as f:
        f.write(b" " * (1 << 20))
    with pytest.raises(CacheCorruptError) as err, open_cache(url).tokenizer_files():
        pass
    _refused(err, "tokenizer.json does not match")


def test_oversized_or_garbage_commit_records_are_one_line_errors(tmp_path) -> None:
    url = str(tmp_path / "c")
    make_cache(url, shards=1, finalize=False)
    record = tmp_path / "c" / "commits" / "000000.json"
    record.write_bytes(b"[" * 2000 + b"]" * 2000)
    with pytest.raises(CacheCorruptError) as err:
        CacheWriter(url, draft()).committed()
    _refused(err, "000000.json is not valid JSON (RecursionError")
    with open(record, "r+b") as f:
        f.truncate((1 << 20) + 1)
    with pytest.raises(CacheCorruptError) as err:
        CacheWriter(url, draft()).committed()
    _refused(err, "000000.json is larger than 1 MiB", "delete it")


# -- bounded manifest fields -----------------------------------------------------------------


def _manifest_json() -> dict:
    data = json.loads(to_json(draft()))
    data["shards"] = [
        {
            "name": "shards/000000.arrow",
            "index": 0,
            "num_tokens": 1,
            "num_sequences": 1,
            "nbytes": 1,
            "checksum": "x",
        }
    ]
    return data


@pytest.mark.parametrize(
    "path,value,needle",
    [
        (("dataset", "num_tokens"), 10**400, "integer in [0, 9007199254740991]"),
        (("shards", 0, "num_tokens"), 10**400, "ShardInfo.num_tokens"),
        (("shards", 0, "nbytes"), 2**53, "ShardInfo.nbytes"),
        (("shards", 0, "num_sequences"), -1, "ShardInfo.num_sequences"),
        (("shards", 0, "index"), 10**9, "ShardInfo.index"),
        (("layout", "k"), 0, "k = 0 with samples"),  # k = 0 needs compact samples
        (("layout", "k"), 2**40, "Layout.k"),
        (("layout", "vocab_size"), 2**31, "Layout.vocab_size"),
        (("layout", "num_samples"), 10**7, "Layout.num_samples"),
        (("layout", "temperatures"), [2.0, 0.0], "Layout.temperatures"),
        (("layout", "temperatures"), [float("nan")], "Layout.temperatures"),
        (("layout", "temperatures"), [1.0] * 65, "more than the 64 allowed"),
        (("build", "sample_temperature"), float("inf"), "BuildSettings.sample_temperature"),
        (("build", "sample_temperature"), 10**400, "BuildSettings.sample_temperature"),
        (("tokenizer", "pad_token_id"), -5, "TokenizerInfo.pad_token_id"),
        (("teacher", "name_or_path"), "x" * 70_000, "more than the 65536 allowed"),
        (("shards", 0, "fidelity"), {"tail_mass_sum": float("nan")}, "must be a finite number"),
        (("shards", 0, "fidelity"), {"topk_kl_sum": -float("inf")}, "must be a finite number"),
        (("build", "config"), {"a": float("inf")}, "non-finite"),
        (("build", "config"), {"a": 10**30}, "out-of-range integer"),
        (("encoding",), {"ids": "uint16", "values": "q9000"}, "q9000"),
        (("encoding",), {"ids": ["uint16"], "values": "q8c"}, "encoding"),
        (("shards", 0, "name"), "shards/a\nb.arrow", "not inside"),
    ],
)
def test_out_of_bounds_fields_are_one_line_refusals(path, value, needle) -> None:
    data = _manifest_json()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(CacheCorruptError) as err:
        parse_manifest(data)
    _refused(err, needle)


def test_free_form_blocks_are_bounded_in_depth() -> None:
    data = _manifest_json()
    deep: object = 1
    for _ in range(900):  # within json.loads' reach, beyond what a printer survives
        deep = {"a": deep}
    data["build"]["config"] = deep
    with pytest.raises(CacheCorruptError) as err:
        parse_manifest(data)
    _refused(err, "nested more than 32 levels")


def test_ids_too_narrow_for_the_vocabulary_are_refused() -> None:
    data = _manifest_json()
    data["layout"]["vocab_size"] = data["tokenizer"]["vocab_size"] = 70_000
    with pytest.raises(CacheCorruptError) as err:
        parse_manifest(data)
    _refused(err, "uint16")


@pytest.mark.parametrize("name", ["../manifest.json", "a/b.json", "..", "", "x\ny"])
def test_tokenizer_file_names_must_be_plain(name) -> None:
    data = _manifest_json()
    tok = dataclasses.asdict(TokenizerInfo(name_or_path="t", fingerprint="f", vocab_size=100))
    tok["files"] = [{"name": name, "nbytes": 1, "checksum": "sha256:x"}]
    data["tokenizer"] = tok
    with pytest.raises(CacheCorruptError) as err:
        parse_manifest(data)
    _refused(err, "not a plain file name")


def test_tokenizer_declared_sizes_are_bounded() -> None:
    data = _manifest_json()
    data["tokenizer"]["files"] = [{"name": "t.json", "nbytes": 1 << 40, "checksum": "sha256:x"}]
    with pytest.raises(CacheCorruptError) as err:
        parse_manifest(data)
    _refused(err, "256 MiB a file")


def test_unknown_encoding_in_a_hand_made_manifest_is_a_cache_error(tmp_path) -> None:
    m = dataclasses.replace(draft(), encoding={"ids": "uint16", "values": "q9000"})
    with pytest.raises(CacheCorruptError) as err:
        Cache("mem", *resolve(str(tmp_path)), m)
    _refused(err, "q9000")


# -- errors are one line; the storage layer is wrapped ----------------------------------------


def test_errors_escape_line_breaks() -> None:
    exc = CacheCorruptError("shard a\nb\r\u2028c", hint="fix\nit")
    assert str(exc).splitlines() == [str(exc)]
    assert "a\\nb\\r\\u2028c" in str(exc) and "fix\\nit" in str(exc)


def test_storage_failures_become_kdcache_errors_naming_the_url() -> None:
    url = "s3://alice:hunter2@bucket/cache?X-Amz-Signature=abc123"
    with pytest.raises(StorageError) as err, storage_errors(url, "reading"):
        raise ConnectionRefusedError(111, "refused by alice:hunter2 sig abc123")
    _refused(err, "s3://bucket/cache", "ConnectionRefusedError")
    assert "hunter2" not in str(err.value) and "abc123" not in str(err.value)
    assert isinstance(err.value.__cause__, ConnectionRefusedError)
    with pytest.raises(CacheNotFoundError), storage_errors("/x", "reading"):
        raise FileNotFoundError(2, "No such file", "/x/manifest.json")
    with pytest.raises(StorageError, match="permission denied"), storage_errors("/x", "reading"):
        raise PermissionError(13, "Permission denied")
    with pytest.raises(CacheCorruptError, match="mine"), storage_errors("/x", "reading"):
        raise CacheCorruptError("mine")  # kdcache's own errors pass through
    with pytest.raises(KeyError), storage_errors("/x", "reading"):
        raise KeyError("a bug stays a bug")


def test_botocore_errors_are_wrapped_when_botocore_is_there() -> None:
    exceptions = pytest.importorskip("botocore.exceptions")
    with pytest.raises(StorageError) as err, storage_errors("s3://b/c", "opening the cache"):
        raise exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b/c")
    _refused(err, "s3://b/c", "EndpointConnectionError")


def test_unknown_scheme_and_missing_package_are_config_errors(monkeypatch) -> None:
    with pytest.raises(ConfigError) as err:
        open_cache("foo://bucket/cache")
    _refused(err, "'foo://'", "s3", "memory")
    monkeypatch.setitem(
        known_implementations,
        "kdtest",
        {"class": "kdcache_no_such_package.FS", "err": "pip install kdcache-no-such-package"},
    )
    with pytest.raises(ConfigError) as err:
        open_cache("kdtest://bucket/cache")
    _refused(err, "not installed", "kdcache-no-such-package")


def test_deeply_nested_shard_metadata_is_a_one_line_error(tmp_path) -> None:
    """zarr parses a shard's attributes on its own thread, with a fresh stack; the identity
    check then prints them on the caller's, which may be deep (a DataLoader worker)."""
    from tests.schemas.test_fuzz import _set_shard_metadata, _with_headroom

    root = tmp_path / "c"
    make_cache(str(root), "zarr", shards=1)
    cache = open_cache(str(root))
    buried: object = 4
    for _ in range(900):
        buried = [buried]
    _set_shard_metadata(
        root, "zarr", {**cache.expected_identity(cache.shards[0]), "layout": buried}
    )
    with pytest.raises(CacheCorruptError) as err:
        _with_headroom(lambda: open_cache(str(root)).reader(0), headroom=300)
    _refused(err, "does not belong here", "layout")
