"""Every way a cache or a URL can be wrong ends in one line from the real `kdcache`, run in a
fresh process, never in a traceback or a hang (each run has a timeout that fails the test)."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from schemas.validate import validate_cache
from tests.fixtures.cli import kdcache, one_line_error
from tests.schemas.test_cache import make_cache

TIMEOUT = 60
"""Seconds before a command counts as hung (each takes a few)."""


def _fails_in_one_line(*args: str) -> str:
    """Run `kdcache ARGS`; its one error line. `validate` reports what it finds as one
    'error: ...' line per problem, every other command as click's one 'Error: ...' line."""
    proc = kdcache(*args, check=False, timeout=TIMEOUT)
    if args[0] != "validate":
        return one_line_error(proc)
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].lower().startswith("error:"), proc.stderr
    return lines[0]


def _every_reader(cache: str, tmp_path: Path, *options: str) -> list[str]:
    """The error lines of inspect, validate --deep and train on `cache` (run side by side)."""
    commands = [
        ("inspect", cache, *options),
        ("validate", "--deep", cache, *options),
        ("train", "--cache", cache, "--out", str(tmp_path / "run"), *options),
    ]
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: _fails_in_one_line(*args), commands))


# -- links inside a cache ---------------------------------------------------------------------


def _link(root: Path, fmt: str, case: str) -> str:
    """Put one link into the cache at `root`; the path an error must name."""
    shard = root / "shards" / f"000001.{fmt}"
    if case == "shard-to-dev-zero":
        if fmt == "zarr":  # a chunk file inside the group
            shard = max(
                (p for p in shard.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
            )
        shard.unlink()
        shard.symlink_to("/dev/zero")
        return str(shard)
    if case == "manifest-outside":
        (root / "manifest.json").rename(root.parent / "outside.json")
        (root / "manifest.json").symlink_to(root.parent / "outside.json")
        return str(root / "manifest.json")
    if case == "tokenizer-outside":
        secrets = root.parent / "secrets"
        secrets.mkdir()
        (secrets / "tokenizer.json").write_text("{}")
        (root / "tokenizer").symlink_to(secrets)
        return str(root / "tokenizer")
    (root / "shards").rename(root.parent / "shards-elsewhere")
    (root / "shards").symlink_to(root.parent / "shards-elsewhere")
    return str(root / "shards")


@pytest.mark.parametrize("fmt", ["arrow", "zarr"])
@pytest.mark.parametrize(
    "case", ["shard-to-dev-zero", "manifest-outside", "tokenizer-outside", "shards-folder"]
)
def test_links_inside_a_cache_are_refused_by_every_reader(tmp_path, fmt, case) -> None:
    root = tmp_path / "c"
    make_cache(str(root), fmt)
    assert validate_cache(str(root), deep=True) == []  # the cache itself is fine
    linked = _link(root, fmt, case)
    for line in _every_reader(str(root), tmp_path):
        assert f"{linked} is a symbolic link" in line and "Fix:" in line, line


def test_a_cache_root_that_is_a_link_opens(tmp_path) -> None:
    make_cache(str(tmp_path / "real"), "zarr")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert "is valid" in kdcache("validate", "--deep", str(tmp_path / "link")).stdout


# -- manifests that used to end in a traceback ------------------------------------------------


def _edit_manifest(root: Path, edit) -> None:
    data = json.loads((root / "manifest.json").read_text())
    edit(data)
    (root / "manifest.json").write_text(json.dumps(data))


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_manifest(tmp_path, depth) -> None:
    root = tmp_path / "c"
    make_cache(str(root))
    text = (root / "manifest.json").read_text()
    nested = "[" * depth + "]" * depth
    (root / "manifest.json").write_text(text.replace('"config": {}', f'"config": {nested}', 1))
    for line in _every_reader(str(root), tmp_path):
        assert "manifest.json" in line, line


def test_unknown_encoding_name(tmp_path) -> None:
    root = tmp_path / "c"
    make_cache(str(root))
    _edit_manifest(root, lambda m: m["encoding"].update(values="q9000"))
    for line in _every_reader(str(root), tmp_path):
        assert "q9000" in line and "q8c" in line, line  # the valid names are listed


@pytest.mark.parametrize("field", ["dataset", "shard"])
def test_huge_token_count(tmp_path, field) -> None:
    root = tmp_path / "c"
    make_cache(str(root))
    text = (root / "manifest.json").read_text()
    data = json.loads(text)
    node = data["dataset"] if field == "dataset" else data["shards"][0]
    node["num_tokens"] = 123456789
    huge = json.dumps(data).replace("123456789", "1" + "0" * 400)  # 10**400
    (root / "manifest.json").write_text(huge)
    for line in _every_reader(str(root), tmp_path):
        assert "num_tokens must be an integer in [0, 9007199254740991]" in line, line


# -- storage that is down or unknown ----------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_s3_endpoint_that_is_down(tmp_path) -> None:
    pytest.importorskip("s3fs")
    endpoint = f"client_kwargs.endpoint_url=http://127.0.0.1:{_closed_port()}"
    defaults = ["--storage-option", endpoint, "--storage-option", "key=x"]
    defaults += ["--storage-option", "secret=x"]
    # One attempt instead of botocore's five: the same error, sooner.
    quick = [*defaults, "--storage-option", "config_kwargs.retries.max_attempts=1"]
    with ThreadPoolExecutor(1) as pool:  # with default retries too, once (it takes seconds)
        slow = pool.submit(_fails_in_one_line, "inspect", "s3://bucket/cache", *defaults)
        lines = [*_every_reader("s3://bucket/cache", tmp_path, *quick), slow.result()]
    for line in lines:
        assert "s3://bucket/cache" in line and "EndpointConnectionError" in line, line


@pytest.mark.parametrize(
    "args,option",
    [
        (["build", "--out", "foo://x"], "--out"),
        (["inspect", "foo://x"], "CACHE"),
        (["validate", "foo://x"], "CACHE"),
        (["train", "--cache", "foo://x", "--out", "run"], "--cache"),
        (["train", "--cache", "c", "--eval-cache", "foo://x", "--out", "run"], "--eval-cache"),
    ],
)
def test_unknown_url_scheme_names_the_option_and_the_known_ones(args, option) -> None:
    proc = kdcache(*args, check=False, timeout=TIMEOUT)
    line = one_line_error(proc)
    assert f"{option} 'foo://x' has an unknown storage scheme 'foo://'" in line, line
    assert "s3" in line and "memory" in line and "file" in line, line


def test_build_checks_out_before_reading_the_dataset(tmp_path) -> None:
    """From Python too: a bad --out fails at once, not after the data pass."""
    from cache_builder import BuildConfig, build
    from schemas.errors import ConfigError

    missing = tmp_path / "no-such-dataset.jsonl"
    with pytest.raises(ConfigError, match="--out 'foo://x' has an unknown storage scheme"):
        build(BuildConfig(out="foo://x", dataset=str(missing), progress=False))


def test_failures_nothing_wrapped_still_print_one_line() -> None:
    """The last net under every command: a store's error that no code of ours wrapped."""
    import click
    from click.testing import CliRunner

    from kdcache.cli import friendly_errors

    exceptions = pytest.importorskip("botocore.exceptions")

    @click.command()
    @click.argument("kind")
    @friendly_errors
    def cmd(kind: str) -> None:
        if kind == "botocore":
            raise exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:9/b")
        raise OSError(5, "Input/output error\nat block 7", "/data/c/manifest.json")

    for kind, needle in [("botocore", "EndpointConnectionError"), ("os", "Input/output")]:
        result = CliRunner().invoke(cmd, [kind])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and needle in result.output


def test_a_storage_option_the_store_does_not_take_is_one_line(tmp_path) -> None:
    """s3fs passes its options to its client only when it first talks to the store."""
    proc = kdcache(
        "inspect", "s3://kdcache-nowhere/cache", "--storage-option", "retries=1",
        "--storage-option", "client_kwargs.endpoint_url=http://127.0.0.1:9",
        check=False, timeout=60,
    )  # fmt: skip
    line = one_line_error(proc)
    assert "retries" in line and "--storage-option" in line


def test_a_store_client_failing_inside_another_library_names_the_commands_cache() -> None:
    """aiohttp's error (zarr or s3fs reading, every retry spent) names no cache by itself."""
    import aiohttp
    import click
    from click.testing import CliRunner

    from kdcache._options import friendly_errors

    @click.command()
    @click.option("--out")
    @friendly_errors
    def build(out: str) -> None:
        raise aiohttp.ClientPayloadError("Response payload is not completed")

    result = CliRunner().invoke(build, ["--out", "s3://team/cache"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    line = result.output.strip()
    assert line.startswith("Error: s3://team/cache: the storage failed while `kdcache build` ran")
    assert "ClientPayloadError: Response payload is not completed. Fix: " in line
