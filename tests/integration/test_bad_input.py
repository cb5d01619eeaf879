"""Bad input to `kdcache build`: each case is one line naming the file and row and the fix, or,
with --skip-bad-rows, a valid cache without the bad rows and their count in the summary and the
manifest. And a non-empty directory that is not a cache is refused as --out before any work.

Every case is a dataset directory: `a.jsonl` (two good documents) beside one damaged file that
also holds good rows, so a skipping build keeps exactly the good ones. Each refusal runs through
the installed `kdcache` script in a fresh process (two at a time), where a traceback would show;
the skipping builds run the same command in this process (a fresh one would spend most of its
time importing transformers).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from kdcache.cli import main
from schemas import open_cache
from schemas.validate import validate_cache
from tests.fixtures.cli import kdcache, one_line_error

pytestmark = [pytest.mark.integration, pytest.mark.reliability("bad-input")]

SETTINGS = ["--max-length", "64", "--top-k", "4", "--shard-tokens", "512", "--batch-tokens", "256"]
GOOD = [
    "The quick brown fox jumps over the lazy dog.",
    "Lists are mutable sequences, typically used to store collections.",
]


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def text(i: int) -> dict[str, str]:
    return {"text": f"Document {i} of the damaged file: a for loop over a list."}


def parquet(rows: int) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [text(i)["text"] for i in range(rows)]}), buf)
    return buf.getvalue()


_LONG = jsonl(*(text(i) for i in range(400)))
_CUT_GZ = gzip.compress(_LONG)[: len(gzip.compress(_LONG)) // 2]


def _lines_before_the_cut() -> int:
    """The whole lines a reader can decompress from `_CUT_GZ` before it ends."""
    return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(_CUT_GZ).count(b"\n")


@dataclass(frozen=True)
class Case:
    name: str
    """The damaged file, written beside a.jsonl."""
    data: bytes
    where: str
    """What the error must name: the file and, where there are any, its line or row."""
    what: str
    """A regular expression for what the error says is wrong."""
    skipped_rows: int
    documents: int
    """Documents a build with --skip-bad-rows keeps from the damaged file."""
    skipped_files: int = 0
    """Files whose unreadable rest --skip-bad-rows leaves out."""
    args: tuple[str, ...] = field(default=())


CASES = [
    Case(
        "b.jsonl",
        jsonl(text(0), text(1)) + b'{"text": "Latin-1 caf\xe9"}\n' + jsonl(text(2)),
        "b.jsonl:3",
        r"not valid UTF-8 \(byte 0xe9",
        1,
        3,
    ),
    Case(
        "b.txt",
        b"First block.\n\nSecond block,\nwith a \xff byte.\n\nThird block.\n",
        "b.txt:4",
        r"not valid UTF-8 \(byte 0xff",
        1,
        2,
    ),
    Case(
        "b.csv",
        b"text,id\nfine,1\ncaf\xe9,2\nalso fine,3\n",
        "b.csv:3",
        r"not valid UTF-8 \(byte 0xe9",
        1,
        2,
    ),
    Case(
        "b.jsonl",
        jsonl(text(0)) + b'{"text": "a lone \\ud800 surrogate"}\n' + jsonl(text(1)),
        "b.jsonl:2",
        r"lone surrogate \(U\+D800\)",
        1,
        2,
    ),
    Case(
        "b.jsonl",
        jsonl({"input_ids": [5, 6, 7]}, {"input_ids": [[5, 6], [7]]}, {"input_ids": [[5], [6]]}),
        "b.jsonl:2",
        r"'input_ids' is not a flat list of integers",
        2,
        1,
    ),
    Case("b.parquet", parquet(3)[:-20], "b.parquet", r"corrupt or cut short", 0, 0, 1),
    Case("b.parquet", b"", "b.parquet", r"corrupt or cut short.*0 bytes", 0, 0, 1),
    Case(
        "b.jsonl.gz",
        _CUT_GZ,
        "b.jsonl.gz",
        r"corrupt or cut short after \d+ rows",
        0,
        _lines_before_the_cut(),
        1,
    ),
    Case("b.jsonl.gz", _LONG[:200], "b.jsonl.gz", r"corrupt or cut short after 0 rows", 0, 0, 1),
    Case(
        "b.jsonl",
        jsonl(text(0), [1, 2], "text", text(1)),
        "b.jsonl:2",
        r"a JSON list, not an object",
        2,
        2,
    ),
    Case(
        "b.jsonl",
        jsonl(
            text(0),
            {"text": 123},
            {"text": 0},
            {"text": False},
            {"text": ["a"]},
            {"text": None},  # an empty document: not bad, and no tokens
            {"text": ""},
            text(1),
        ),
        "b.jsonl:2",
        r"'text' is int \(123\), not a string",
        4,
        2,
    ),
    Case(
        "b.jsonl",
        jsonl(text(0), {"body": "no text here"}, text(1)),
        "b.jsonl:2",
        r"no 'text' column \(columns: 'body'\)",
        1,
        2,
    ),
    Case(
        "b.csv",
        b"text,id\nfine,1\nan unquoted, comma,2\nshort\nalso fine,3\n",
        "b.csv:3",
        r"has 3 fields, the header 2",
        2,
        2,
    ),
    Case(
        "b.jsonl",
        jsonl(text(0)) + b'{"text": "unclosed\n' + jsonl(text(1)),
        "b.jsonl:2",
        r"not valid JSON",
        1,
        2,
    ),
    Case(
        "b.jsonl",
        jsonl({"input_ids": [1, 2]}, {"input_ids": [1, 99999]}),
        "b.jsonl:2",
        r"outside the tokenizer's vocabulary",
        1,
        1,
    ),
    Case(
        "b.json",
        b'[{"text": "fine"}, {"text": "cut',
        "b.json",
        r"not valid JSON",
        0,
        0,
        1,
    ),
]
IDS = [
    "utf8-jsonl",
    "utf8-txt",
    "utf8-csv",
    "lone-surrogate",
    "ragged-input-ids",
    "corrupt-parquet",
    "empty-parquet",
    "truncated-jsonl-gz",
    "not-gzip",
    "json-line-not-object",
    "text-not-a-string",
    "missing-column",
    "csv-field-count",
    "invalid-json-line",
    "ids-outside-vocabulary",
    "invalid-json-array",
]


def build_args(root: Path, case: Case, teacher: Path) -> list[str]:
    """`kdcache build` of the case's dataset (written under `root`) into `root`/cache."""
    folder = root / "data"
    folder.mkdir(parents=True)
    (folder / "a.jsonl").write_bytes(jsonl(*({"text": t} for t in GOOD)))
    (folder / case.name).write_bytes(case.data)
    args = ["build", "--teacher", str(teacher), "--dataset", str(folder)]
    return [*args, "--out", str(root / "cache"), *SETTINGS, "--no-progress", *case.args]


@pytest.fixture(scope="module")
def refusals(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path
) -> dict[str, tuple[Path, subprocess.CompletedProcess[str]]]:
    """Every case built without --skip-bad-rows, each in a fresh process, two at a time."""
    jobs = []
    for case_id, case in zip(IDS, CASES, strict=True):
        root = tmp_path_factory.mktemp(case_id)
        jobs.append((case_id, root / "cache", build_args(root, case, tiny_llama_dir)))
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda job: kdcache(*job[2], check=False, timeout=300), jobs)
        return {key: (out, proc) for (key, out, _), proc in zip(jobs, done, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_input_is_one_line_naming_the_file_and_row(case: Case, refusals: dict) -> None:
    out, proc = refusals[IDS[CASES.index(case)]]
    line = one_line_error(proc)
    assert case.where in line, line
    assert re.search(case.what, line), line
    assert "Fix:" in line and "--skip-bad-rows" in line, line
    assert not out.exists() or not any(out.iterdir()), "a refused build left files in --out"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_skip_bad_rows_builds_a_valid_cache_and_counts_them(
    case: Case, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    args = [*build_args(tmp_path, case, tiny_llama_dir), "--skip-bad-rows"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output[-3000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("built "), summary
    counted = []
    if case.skipped_rows:
        counted.append(f"{case.skipped_rows} bad row{'s' if case.skipped_rows > 1 else ''}")
    if case.skipped_files:
        counted.append(f"the unreadable rest of {case.skipped_files} file")
    assert f"skipped {' and '.join(counted)} (--skip-bad-rows" in summary, summary
    assert case.where in summary, summary  # the first one skipped, named
    out = tmp_path / "cache"
    assert validate_cache(str(out), deep=True) == []
    manifest = open_cache(str(out)).manifest
    assert manifest.dataset.num_documents == len(GOOD) + case.documents
    config = manifest.build.config
    assert config["skip_bad_rows"] is True
    assert (config["skipped_rows"], config["skipped_files"]) == (
        case.skipped_rows,
        case.skipped_files,
    )


def test_skip_bad_rows_is_documented() -> None:
    help_text = kdcache("build", "--help").stdout
    assert "--skip-bad-rows" in help_text
    assert "counted" in help_text.split("--skip-bad-rows", 1)[1][:400]


# -- --out ------------------------------------------------------------------------------------


def test_a_non_empty_directory_that_is_no_cache_is_refused_before_any_work(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    # Neither the teacher nor the dataset exists: the --out check must come first.
    missing = ["--teacher", str(tmp_path / "no-teacher"), "--dataset", str(tmp_path / "no.jsonl")]
    line = one_line_error(kdcache("build", *missing, "--out", str(out), check=False))
    assert str(out) in line and "not empty" in line and "--overwrite" in line, line
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    data = tmp_path / "docs.jsonl"
    data.write_bytes(jsonl(*({"text": t} for t in GOOD)))
    args = ["build", "--teacher", str(tiny_llama_dir), "--dataset", str(data), *SETTINGS]
    args += ["--no-progress", "--out", str(out)]
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
    assert validate_cache(str(out), deep=True) == []
    assert (out / "notes.txt").read_text() == "mine"
    # A cache is not refused: the same command again finds it complete.
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0 and "already complete" in done.stdout, done.output
