"""schemas/FORMAT.md: generated from the code, complete, and its programs right.

The programs of FORMAT.md (the decoder, the checksum and the fingerprint) run in fresh
interpreters where kdcache's packages and torch cannot be imported (`tests.fixtures.isolated`),
on caches the library writes, and must give kdcache's own answers: ids, log-probabilities and
lse bit for bit, checksums and fingerprints exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import json
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest

from schemas import _arrow, _spec_tables, _zarr, spec
from schemas._columns import sequence_columns, token_columns
from schemas.cache import CacheWriter, open_cache
from schemas.encodings import ID_ENCODINGS, VALUE_ENCODINGS, TopkEncoding
from schemas.manifest import BuildSettings, DatasetInfo, Manifest, TeacherInfo, TokenizerInfo
from schemas.record import RECORD_FIELDS, Layout
from schemas.testing import random_records
from tests.fixtures.isolated import RESULT, example, result, run_isolated

ROOT = Path(__file__).parents[2]
OLD_CACHES = [
    ROOT / "tests" / "fixtures" / "data" / f"cache-1.0-{fmt}" for fmt in ("arrow", "zarr")
]

LAYOUTS = (
    Layout(k=5, vocab_size=300, temperatures=(2.0,), num_samples=4, content_keys=True),
    Layout(k=7, vocab_size=7),  # k = V: -inf tails
    Layout(k=6, vocab_size=70_000, content_keys=True),  # ids beyond uint16
    Layout(k=5, vocab_size=300, num_samples=6, content_keys=True, compact_samples=True),  # 3.0
    Layout(k=0, vocab_size=300, num_samples=6, content_keys=True, compact_samples=True),
)


def _draft(fmt: str, layout: Layout, encoding: TopkEncoding) -> Manifest:
    return Manifest(
        format=fmt,
        teacher=TeacherInfo(name_or_path="teacher", weights_sha256="sha256:w"),
        tokenizer=TokenizerInfo(
            name_or_path="tok", fingerprint="sha256:t", vocab_size=layout.vocab_size
        ),
        dataset=DatasetInfo(source="d", fingerprint="sha256:d", num_documents=10, num_tokens=26),
        build=BuildSettings(
            top_k=layout.k,
            max_length=8,
            temperatures=layout.temperatures,
            num_samples=layout.num_samples,
        ),
        layout=layout,
        encoding=encoding.to_json(),
    )


def build_cache(root: Path, fmt: str, layout: Layout, encoding: TopkEncoding, seed: int) -> Path:
    """Two shards, each of two record batches (an empty sequence among them), with the edge
    values of `random_records`: -0.0 top-1s, NaN labels, -inf tails when k = V."""
    writer = CacheWriter(str(root), _draft(fmt, layout, encoding))
    for index in range(2):
        with writer.shard_writer(index) as w:
            w.write(random_records(layout, [3, 0, 4], seed=seed + index))
            w.write(random_records(layout, [5, 1], seed=seed + 10 + index))
            writer.commit_shard(w)
    writer.finalize(2)
    return root


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A cache for every (ids, values) encoding; each id and each value encoding in both
    formats."""
    made = []
    for i, ids in enumerate(ID_ENCODINGS):
        for v, values in enumerate(VALUE_ENCODINGS):
            layout = LAYOUTS[(v + i) % len(LAYOUTS)]
            if ids == "uint16" and layout.vocab_size > 1 << 16:
                layout = LAYOUTS[0]
            fmt = ("arrow", "zarr")[(i + v) % 2]
            root = tmp_path_factory.mktemp(f"{fmt}-{ids}-{values}")
            made.append(build_cache(root, fmt, layout, TopkEncoding(ids, values), seed=i * 7 + v))
    return made


def test_format_md_is_what_the_code_generates() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "schemas.spec"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    current = spec.FORMAT_MD.read_text(encoding="utf-8")
    if done.stdout != current:
        diff = difflib.unified_diff(
            current.splitlines(), done.stdout.splitlines(), "FORMAT.md", "generated", lineterm=""
        )
        shown = "\n".join(list(diff)[:60])
        pytest.fail(f"schemas/FORMAT.md is out of date; run `{spec.REGENERATE}`\n{shown}")


def test_check_flag_names_the_fix(tmp_path: Path, monkeypatch, capsys) -> None:
    stale = tmp_path / "FORMAT.md"
    stale.write_text("# an old spec\n")
    monkeypatch.setattr(spec, "FORMAT_MD", stale)
    assert spec.main(["--check"]) == 1
    assert spec.REGENERATE in capsys.readouterr().err
    assert spec.main(["--write"]) == 0 and spec.main(["--check"]) == 0


def _manifest_fields() -> dict[str, list[str]]:
    """Class name -> field names, for `Manifest` and every dataclass inside it."""
    found, out = [Manifest], {}
    for cls in found:
        hints = typing.get_type_hints(cls)
        out[cls.__name__] = [f.name for f in dataclasses.fields(cls) if f.name != "extensions"]
        for f in dataclasses.fields(cls):
            stack = [hints[f.name]]
            while stack:
                tp = stack.pop()
                if dataclasses.is_dataclass(tp) and tp not in found:
                    found.append(tp)
                stack += typing.get_args(tp)
    return out


def test_every_field_column_and_parameter_is_specified() -> None:
    text = spec.FORMAT_MD.read_text(encoding="utf-8")
    cells = {
        cell.strip()
        for line in text.splitlines()
        if line.startswith("| ")
        for cell in line.split("|")
    }
    columns = {f.name for f in RECORD_FIELDS} | set(sequence_columns())
    for layout in LAYOUTS:
        for ids in ID_ENCODINGS:
            for values in VALUE_ENCODINGS:
                try:
                    columns |= set(token_columns(layout, TopkEncoding(ids, values)))
                except ValueError:  # uint16 ids for a vocabulary beyond 65,536
                    continue
    missing = sorted(c for c in columns if f"`{c}`" not in cells)
    assert not missing, f"stored columns missing from FORMAT.md's tables: {missing}"
    for cls, names in _manifest_fields().items():
        section = text.split(f"\n### {cls}\n", 1)[1].split("\n### ", 1)[0]
        absent = [n for n in names if f"| `{n}` |" not in section]
        assert not absent, f"manifest fields of {cls} missing from FORMAT.md: {absent}"
    for name in ID_ENCODINGS:
        assert f"| `{name}` |" in text
    for name in VALUE_ENCODINGS:
        assert f"| `{name}` |" in text
        params = TopkEncoding("uint32", name).describe().get("value_params", {})
        for key, value in params.items():
            assert f"{key}={json.dumps(value)}" in text, (name, key)
    assert f"min(length, {_zarr.CHUNK_TOKENS:,})" in text
    assert f"zstd (level {_arrow._ZSTD_LEVEL})" in text


def test_notes_never_stand_in_for_a_docstring() -> None:
    with pytest.raises(ValueError, match="weights_sha256"):
        _spec_tables.manifest_tables({"TeacherInfo.weights_sha256": "documented in the code"})
    with pytest.raises(ValueError, match="renamed"):
        _spec_tables.manifest_tables({"TeacherInfo.renamed": "no such field"})


def test_format_md_ships_in_the_package() -> None:
    from setuptools.config.pyprojecttoml import read_configuration

    config = read_configuration(ROOT / "pyproject.toml", expand=False)
    patterns = config["tool"]["setuptools"]["package-data"].get("schemas", [])
    assert any(fnmatch.fnmatch("FORMAT.md", p) for p in patterns), patterns


def test_isolation_blocks_kdcache_and_torch(tmp_path: Path) -> None:
    probe = (
        "import importlib.util, json\n"
        "blocked = []\n"
        "for name in ('schemas', 'kdcache', 'torch'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        blocked.append(importlib.util.find_spec(name) is None)\n"
        f"print({RESULT!r} + json.dumps(blocked))\n"
    )
    assert result(run_isolated(probe, tmp_path)) == [True, True, True]


_DECODE_ALL = """
import json, runpy, sys
from pathlib import Path
import numpy as np

reader = Path("read_kdcache.py")
reader.write_text({code!r})
ns = runpy.run_path(str(reader), run_name="read_kdcache")
for j, path in enumerate({paths!r}):
    meta, column = ns["load"](path)
    ids, logprobs, lse = ns["decode"](meta, column)
    drawn = {{}}
    if meta["layout"]["num_samples"]:
        drawn = dict(zip(("sample_ids", "sample_counts", "sample_logprobs"), ns["samples"](meta, column)))
    np.savez(f"decoded-{{j}}.npz", ids=ids, logprobs=logprobs, lse=lse, **drawn)
sys.argv = [str(reader), {paths!r}[0], "3"]
runpy.run_path(str(reader), run_name="__main__")
print({mark!r} + json.dumps(len({paths!r})))
"""


def test_reader_decodes_like_kdcache(caches: list[Path], tmp_path: Path) -> None:
    expected, paths = [], []
    for root in caches:
        cache = open_cache(str(root))
        for i, info in enumerate(cache.shards):
            paths.append(str(root / info.name))
            expected.append(cache.read_shard(i))
    code = _DECODE_ALL.format(code=example("reader"), paths=paths, mark=RESULT)
    done = run_isolated(code, tmp_path)
    assert result(done) == len(paths)
    for j, (path, want) in enumerate(zip(paths, expected, strict=True)):
        got = np.load(tmp_path / f"decoded-{j}.npz")
        assert got["ids"].dtype == np.int32 and np.array_equal(got["ids"], want.topk_ids), path
        for name, value in (("logprobs", want.topk_logprobs), ("lse", want.lse)):
            assert got[name].dtype == np.float32 and got[name].shape == value.shape, path
            assert got[name].tobytes() == value.tobytes(), f"{name} of {path} differ in bits"
        for name in ("sample_ids", "sample_counts", "sample_logprobs"):
            value = getattr(want, name)
            assert (name in got) == (value is not None), path
            if value is not None:  # every draw (2.x) or the compact ones (3.0), decoded alike
                assert got[name].astype(value.dtype).tobytes() == value.tobytes(), (name, path)
    printed = [line.split() for line in done.stdout.splitlines() if line.startswith("id ")]
    assert [int(words[1]) for words in printed] == expected[0].topk_ids[3].tolist()


_IDENTITIES = """
import json
from pathlib import Path

out = {{}}
for root in {roots!r}:
    manifest = json.loads((Path(root) / "manifest.json").read_text())
    out[root] = {{
        "fingerprint": cache_fingerprint(manifest),
        "checksums": [shard_checksum(Path(root) / s["name"]) for s in manifest["shards"]],
    }}
print({mark!r} + json.dumps(out))
"""


def test_checksum_and_fingerprint_programs_match_kdcache(
    caches: list[Path], tmp_path: Path
) -> None:
    roots = [str(p) for p in (*caches[:2], *OLD_CACHES)]
    code = "\n".join(
        [
            example("checksum"),
            example("fingerprint"),
            _IDENTITIES.format(roots=roots, mark=RESULT),
        ]
    )
    found = result(run_isolated(code, tmp_path))
    for root in roots:
        cache = open_cache(root)
        assert found[root]["checksums"] == [s.checksum for s in cache.shards], root
        assert found[root]["fingerprint"] == cache.manifest.fingerprint, root
        identity = cache.reader(0).identity()
        assert identity["cache_fingerprint"] == found[root]["fingerprint"], root
