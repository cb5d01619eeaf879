"""`kdcache build` and `kdcache train` against an S3 store that fails: 500s, SlowDown,
throttled links and connections dropped mid-transfer (`tests/fixtures/faulty_s3.py`, a proxy
in front of moto that the subprocesses reach with --storage-option).

- Transient faults: the build retries (botocore, s3fs, then `schemas._retry` around kdcache's
  own operations) and the cache equals a fault-free build: the same manifest, byte for byte,
  so the same fingerprint and shard checksums, and `kdcache validate --deep` passes. Training
  retries too and reaches the same loss.
- Persistent faults: the command stops with one line naming the cache's URL, every shard the
  manifest or commits/ lists is whole, and a rerun without faults completes to the same cache.

`make test` runs a hand-picked dozen faults covering every request kind; `make test-long` runs
seeded random schedules (`-m long`), well over a hundred faults across both formats.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from schemas.cache import COMMITS
from schemas.manifest import parse_shard_info
from schemas.storage import checksum_file, checksum_tree
from tests.fixtures.cli import kdcache, one_line_error
from tests.fixtures.faulty_s3 import ACTIONS, KINDS, Fault, FaultyS3
from tests.fixtures.models import tiny_student_config
from tests.fixtures.s3 import cli_storage_options

pytestmark = pytest.mark.integration

BUCKET = "kdcache-faults"
SMALL = ["--max-length", "64", "--top-k", "8", "--shard-tokens", "512", "--batch-tokens", "256"]
GIVE_UP_SOON = ["--storage-option", "config_kwargs.retries.max_attempts=2"]
"""For persistent faults: botocore's attempts per request (5 by default) and ours (env below)
cut down, so that a store that never recovers is given up on in seconds, not minutes."""
GIVE_UP_SOON_ENV = {"KDCACHE_STORAGE_RETRIES": "1"}


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    docs = [rng.integers(1, 384, int(n)).tolist() for n in rng.integers(20, 150, 24)]
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def store(s3_options: dict[str, Any]) -> Any:
    """The bucket, reached directly (no proxy): what the tests inspect results with."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_options, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    return fs


@pytest.fixture(scope="module")
def proxy(s3_options: dict[str, Any], store: Any) -> Iterator[FaultyS3]:
    server = FaultyS3(s3_options["client_kwargs"]["endpoint_url"])
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def faults(proxy: FaultyS3) -> Iterator[FaultyS3]:
    """The proxy, with no faults left scheduled after the test."""
    proxy.clear()
    try:
        yield proxy
    finally:
        proxy.clear()


def via(proxy: FaultyS3, s3_options: dict[str, Any]) -> list[str]:
    return cli_storage_options({**s3_options, "client_kwargs": {"endpoint_url": proxy.url}})


class Reference:
    """A fault-free build through the proxy: its manifest bytes and the requests it made."""

    def __init__(self, url: str, manifest: bytes, counts: Counter[str]) -> None:
        self.url, self.manifest, self.counts = url, manifest, counts


@pytest.fixture(scope="module")
def references(
    proxy: FaultyS3, store: Any, s3_options: dict[str, Any], tiny_llama_dir: Path, documents: Path
) -> Any:
    """`references(fmt)`: the fault-free build of that format, made once per module."""
    made: dict[str, Reference] = {}

    def get(fmt: str) -> Reference:
        if fmt not in made:
            proxy.clear()
            url = f"s3://{BUCKET}/reference-{fmt}"
            build(tiny_llama_dir, documents, url, fmt, via(proxy, s3_options))
            made[fmt] = Reference(url, manifest_bytes(store, url), Counter(proxy.counts))
            proxy.clear()
        return made[fmt]

    return get


def build(teacher: Path, data: Path, url: str, fmt: str, options: list[str], **kw: Any) -> Any:
    return kdcache("build", "--teacher", teacher, "--dataset", data, "--out", url, "--format",
                   fmt, *SMALL, "--no-progress", *options, **kw)  # fmt: skip


def manifest_bytes(store: Any, url: str) -> bytes:
    store.invalidate_cache()
    return store.cat_file(f"{url.removeprefix('s3://')}/manifest.json")


def scheduled(schedule: list[Fault]) -> int:
    """How many failures a schedule of faults that each end injects."""
    return sum(f.times for f in schedule)


def assert_all_fired(proxy: FaultyS3) -> int:
    """Every scheduled fault fired as often as scheduled; returns how many fired."""
    missed = [f for f in proxy.faults if not f.done]
    assert not missed, f"faults that never fired (schedule past the requests made): {missed}"
    return sum(f.fired for f in proxy.faults)


def assert_nothing_half_listed(store: Any, url: str) -> None:
    """Every shard the manifest or a commit record lists is whole: at its place in shards/, or
    (a move the failure interrupted, which a rerun's `recover` finishes) still in staging/."""
    root = url.removeprefix("s3://")
    store.invalidate_cache()
    if store.exists(f"{root}/manifest.json"):
        manifest = json.loads(store.cat_file(f"{root}/manifest.json"))
        assert manifest["status"] == "building", "a failed build marked its cache complete"
        for entry in manifest["shards"]:
            assert whole(store, f"{root}/{entry['name']}", entry), (
                f"{entry['name']} is listed but not whole"
            )
    for path in (
        store.ls(f"{root}/{COMMITS}", detail=False) if store.exists(f"{root}/{COMMITS}") else []
    ):
        if not path.endswith(".json") or path.rsplit("/", 1)[-1].startswith(".tmp-"):
            continue
        record = json.loads(store.cat_file(path))
        staged = record.pop("staged", None)
        info = parse_shard_info(record, path)
        entry = {"checksum": info.checksum, "nbytes": info.nbytes}
        placed = whole(store, f"{root}/{info.name}", entry)
        assert placed or (staged and whole(store, f"{root}/{staged}", entry)), (
            f"{path} commits {info.name}, but neither it nor its staged copy is whole"
        )


def whole(store: Any, path: str, entry: dict[str, Any]) -> bool:
    if not store.exists(path):
        return False
    checksum = checksum_tree if store.isdir(path) else checksum_file
    return checksum(store, path) == (entry["checksum"], entry["nbytes"])


def rerun_to_the_reference(
    ref: Reference, url: str, fmt: str, options: list[str], store: Any, teacher: Path, data: Path
) -> None:
    """A rerun without faults completes to the reference cache. A lock the failed build could
    not release (its store was failing) is broken, as its message tells the user to."""
    store.invalidate_cache()
    lock = ["--break-lock"] if store.exists(f"{url.removeprefix('s3://')}/lock.json") else []
    build(teacher, data, url, fmt, [*options, *lock])
    assert manifest_bytes(store, url) == ref.manifest
    assert not store.find(f"{url.removeprefix('s3://')}/staging"), "the rerun left staged copies"


# -- transient faults --------------------------------------------------------------------------

SHORT_BUILD = [
    Fault("put", "error", after=1),  # an early whole-object write (tokenizer copy, manifest)
    Fault("put", "drop", path="/commits/"),  # a commit record: stored, but the answer is lost
    Fault("put", "delay", path="/staging/", delay=0.5),  # a shard uploads over a slow link
    Fault("get", "drop", path="/staging/"),  # a staged shard read back mid-body for its checksum
    # Commit records read back, broken six times running: more than s3fs's own five tries, so
    # only kdcache's retries (schemas._retry) get through.
    Fault("get", "drop", path="/commits/", after=2, times=6),
    Fault("list", "slowdown", path="/commits/"),
    Fault("copy", "error", after=1, times=2),  # moving shard 1 into shards/
    Fault("head", "drop", after=5),
    Fault("delete", "slowdown"),  # removing a moved shard's staged copy
]


def random_schedule(seed: int, counts: Counter[str], n: int) -> list[Fault]:
    """`n` faults of random kinds and actions, placed inside the first half of the requests of
    their kind a fault-free run made (`counts`), so that every one fires even when a faulted
    run makes fewer of them (listings served from s3fs's cache, say). Every kind is drawn once
    before any is drawn again; a kind's half is cut into one segment per fault, and a fault
    leaves its segment's last request alone, so that no two of them make one longer burst."""
    rng = random.Random(seed)
    room = {k: counts[k] // 2 for k in KINDS if counts[k] // 2}
    assert sum(room.values()) >= n, f"the reference run made too few requests: {counts}"
    chosen = Counter(rng.sample(sorted(room), min(n, len(room))))
    while sum(chosen.values()) < n:
        chosen[rng.choice(sorted(k for k in room if chosen[k] < room[k]))] += 1
    faults = []
    for kind, many in sorted(chosen.items()):
        segment = room[kind] // many
        for i in range(many):
            action = rng.choice(ACTIONS)
            times = rng.randint(1, max(1, min(segment - 1, 2 if action == "delay" else 3)))
            spare = max(0, segment - 1 - times)
            faults.append(
                Fault(kind, action, after=i * segment + rng.randint(0, spare), times=times)
            )
    rng.shuffle(faults)
    return faults


BUILD_CASES = [
    pytest.param("arrow", None, id="arrow-short"),
    *[
        pytest.param(fmt, seed, id=f"{fmt}-seed{seed}", marks=pytest.mark.long)
        for fmt in ("arrow", "zarr")
        for seed in range(8)
    ],
]


@pytest.mark.parametrize("fmt,seed", BUILD_CASES)
@pytest.mark.reliability("storage-transient")
def test_transient_faults_during_build_give_the_same_cache(
    fmt: str, seed: int | None, faults: FaultyS3, references: Any, store: Any,
    s3_options: dict[str, Any], tiny_llama_dir: Path, documents: Path, trials: Any,
) -> None:  # fmt: skip
    ref = references(fmt)
    schedule = SHORT_BUILD if seed is None else random_schedule(seed, ref.counts, 6)
    trials(scheduled(schedule))
    faults.schedule(*schedule)
    url = f"s3://{BUCKET}/transient-{fmt}-{seed}"
    build(tiny_llama_dir, documents, url, fmt, via(faults, s3_options))
    fired = assert_all_fired(faults)
    assert fired == scheduled(schedule)
    assert manifest_bytes(store, url) == ref.manifest  # same fingerprint, shards, checksums
    root = url.removeprefix("s3://")
    assert not store.exists(f"{root}/staging") or not store.find(f"{root}/staging")
    kdcache("validate", url, "--deep", *cli_storage_options(s3_options))


def train(cache: str, out: Path, options: list[str], **kw: Any) -> Any:
    return kdcache("train", "--cache", cache, "--out", out, "--student-config",
                   tiny_student_config(out.parent), "--max-steps", "2", "--batch-tokens", "256",
                   "--no-progress", *options, **kw)  # fmt: skip


@pytest.fixture(scope="module")
def train_reference(
    references: Any, proxy: FaultyS3, s3_options: dict[str, Any], tmp_path_factory: Any
) -> tuple[float, Counter[str]]:
    """(final loss, requests made) of a fault-free training run on the Arrow reference."""
    ref = references("arrow")
    proxy.clear()
    out = tmp_path_factory.mktemp("train-ref") / "run"
    train(ref.url, out, via(proxy, s3_options))
    counts = Counter(proxy.counts)
    proxy.clear()
    return json.loads((out / "result.json").read_text())["final_loss"], counts


SHORT_TRAIN = [
    # A shard's body breaks off mid-transfer six times running: past s3fs's five tries.
    Fault("get", "drop", path="/shards/", after=1, times=6),
    Fault("get", "error", path="/shards/", after=4, times=2),
    Fault("head", "slowdown", after=2),
    Fault("list", "delay", delay=0.5),
]
TRAIN_CASES = [
    pytest.param(None, id="short"),
    *[pytest.param(seed, id=f"seed{seed}", marks=pytest.mark.long) for seed in range(6)],
]


@pytest.mark.parametrize("seed", TRAIN_CASES)
@pytest.mark.reliability("storage-transient")
def test_transient_faults_during_training_reach_the_same_loss(
    seed: int | None, faults: FaultyS3, references: Any, train_reference: Any,
    s3_options: dict[str, Any], tmp_path: Path, trials: Any,
) -> None:  # fmt: skip
    loss, counts = train_reference
    schedule = SHORT_TRAIN if seed is None else random_schedule(100 + seed, counts, 4)
    trials(scheduled(schedule))
    faults.schedule(*schedule)
    train(references("arrow").url, tmp_path / "run", via(faults, s3_options))
    assert assert_all_fired(faults) == scheduled(schedule)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["final_loss"] == loss


# -- persistent faults -------------------------------------------------------------------------

PERSISTENT_BUILD = [
    pytest.param("arrow", Fault("copy", "error", after=1, times=None), id="arrow-copy-error"),
    *[
        pytest.param(fmt, fault, id=f"{fmt}-{fault.kind}-{fault.action}", marks=pytest.mark.long)
        for fmt in ("arrow", "zarr")
        for fault in [
            Fault("put", "error", after=6, times=None),
            Fault("put", "slowdown", path="/commits/", after=2, times=None),
            Fault("put", "drop", path="/commits/", after=1, times=None),
            Fault("get", "error", path="/staging/", after=3, times=None),
            Fault("get", "drop", path="/staging/", after=2, times=None),
            Fault("list", "error", after=10, times=None),
            Fault("list", "slowdown", after=4, times=None),
            Fault("copy", "slowdown", after=2, times=None),
            Fault("copy", "drop", after=1, times=None),
            Fault("head", "error", after=12, times=None),
            # Not ("delete", "drop"): the proxy drops the answer of a delete the store carried
            # out, and the retry finds nothing left to delete, as a move expects: the build
            # goes on (transient schedules drop deletes too).
            Fault("delete", "error", after=1, times=None),
            Fault("delete", "slowdown", after=2, times=None),
        ]
    ],
]


@pytest.mark.parametrize("fmt,fault", PERSISTENT_BUILD)
@pytest.mark.reliability("storage-persistent")
def test_a_store_that_keeps_failing_stops_the_build_with_one_line_and_nothing_half_listed(
    fmt: str, fault: Fault, faults: FaultyS3, references: Any, store: Any,
    s3_options: dict[str, Any], tiny_llama_dir: Path, documents: Path,
) -> None:  # fmt: skip
    """Also a connection dropped inside another library's call (zarr reading a staged shard):
    the command's net names the cache it was writing."""
    ref = references(fmt)
    faults.schedule(fault)
    url = f"s3://{BUCKET}/persistent-{fmt}-{fault.kind}-{fault.action}"
    failed = build(tiny_llama_dir, documents, url, fmt, [*via(faults, s3_options), *GIVE_UP_SOON],
                   env=GIVE_UP_SOON_ENV, check=False)  # fmt: skip
    assert_all_fired(faults)
    line = one_line_error(failed)
    assert url in line, line
    faults.clear()
    assert_nothing_half_listed(store, url)
    rerun_to_the_reference(ref, url, fmt, via(faults, s3_options), store, tiny_llama_dir, documents)


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(Fault("get", "error", path="/shards/", after=2, times=None), id="get-error"),
        pytest.param(
            Fault("get", "drop", path="/shards/", times=None), id="get-drop", marks=pytest.mark.long
        ),
        pytest.param(
            Fault("head", "slowdown", path="/shards/", after=1, times=None),
            id="head-slowdown",
            marks=pytest.mark.long,
        ),
    ],
)
@pytest.mark.reliability("storage-persistent")
def test_a_store_that_keeps_failing_stops_training_with_one_line(
    fault: Fault, faults: FaultyS3, references: Any, s3_options: dict[str, Any], tmp_path: Path
) -> None:
    url = references("arrow").url
    faults.schedule(fault)
    failed = train(url, tmp_path / "run", [*via(faults, s3_options), *GIVE_UP_SOON],
                   env=GIVE_UP_SOON_ENV, check=False)  # fmt: skip
    assert_all_fired(faults)
    line = one_line_error(failed)
    assert url in line and "storage" in line, line
    assert "cannot be decoded" not in line and "--skip-bad-shards" not in line, (
        "a store that fails was reported as a damaged shard"
    )
