"""schemas/FORMAT.md, the cache format's specification, generated from the code that defines it.

    python -m schemas.spec            # print it
    python -m schemas.spec --write    # rewrite schemas/FORMAT.md
    python -m schemas.spec --check    # exit 1 when schemas/FORMAT.md is out of date

Every table is computed (`schemas._spec_tables`): the records from `RECORD_FIELDS`, the stored
columns from `token_columns` and `TopkEncoding.columns`, the parameters from
`TopkEncoding.describe`, the Arrow schema from `arrow_schema`, the manifest fields from the
dataclasses of `schemas.manifest` and their attribute docstrings. The directory tree, the Zarr
codecs and the shard metadata are read back from a small cache written here by the real
writers. Prose explains; where it states a rule exactly (decoding, checksums, fingerprints), a
program in the document does, and the tests run those programs against kdcache.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from schemas import (
    _arrow,
    _lehmer,
    _lockstores,
    _spec_tables,
    _zarr,
    backend,
    cache,
    encodings,
    manifest,
    version,
    writer,
)
from schemas._spec_docs import anchor, attribute_docs, fenced, table
from schemas._spec_examples import (
    CHECKSUM,
    FINGERPRINT,
    INTEROP,
    READER,
    SETUP,
    Written,
    example_manifest,
    write_examples,
)
from schemas._spec_prose import FIELD_NOTES, LIMIT_NOTES, METADATA_KEYS, SECTION_TEXT
from schemas.encodings import TopkEncoding

FORMAT_MD = Path(__file__).with_name("FORMAT.md")
REGENERATE = "python -m schemas.spec --write"
EXAMPLE_MARK = "<!-- example: {} -->"
"""Precedes each program in FORMAT.md, so that the tests find and run it."""


def _example(name: str, code: str) -> str:
    return EXAMPLE_MARK.format(name) + "\n\n" + fenced(code)


def _text(section: str, **values: object) -> str:
    return SECTION_TEXT[section].format(**values).strip()


# -- sections --------------------------------------------------------------------------------


def _directory(w: Written) -> str:
    shard = backend.shard_name(0, "")
    rows = [
        (f"`{cache.MANIFEST}`", "what the cache is and which shards it holds (below)"),
        (f"`{shard}.arrow` or `{shard}.zarr/`", _text("shard_row")),
        (f"`{backend.STAGING_DIR}/{w.staged_name}`", attribute_docs(backend)["STAGING_DIR"]),
        (f"`{cache.COMMITS}/000000.json`", _text("commit_row")),
        (f"`{cache.TOKENIZER_DIR}/`", attribute_docs(cache)["TOKENIZER_DIR"]),
        (f"`{_lockstores.LOCK_FILE}`", _text("lock_row", what=_lock_doc())),
        ("`.tmp-*`", _text("tmp_row")),
    ]
    return "\n\n".join(
        [
            _text("directory"),
            fenced("\n".join(w.trees["arrow"]), "text"),
            table(["path", "what it is"], rows),
            _text("directory_glob"),
        ]
    )


def _lock_doc() -> str:
    return attribute_docs(_lockstores)["LOCK_FILE"].rstrip(".")


def _records(w: Written) -> str:
    rows = _spec_tables.record_rows()
    return "\n\n".join(
        [
            _text("records"),
            table(["field", "dtype", "shape", "present when", "meaning"], rows),
            _text("records_after"),
        ]
    )


def _stored(w: Written) -> str:
    cols = ["column", "stored dtype", "shape", "Zarr shuffle", "meaning"]
    return "\n\n".join(
        [
            _text("stored"),
            table(["column", "dtype", "meaning"], _spec_tables.sequence_rows()),
            _text("stored_tokens"),
            table(cols, _spec_tables.token_column_rows()),
            _text("stored_after"),
        ]
    )


def _encodings(w: Written) -> str:
    cols = ["encoding", "column", "stored dtype", "shape", "Zarr shuffle", "meaning"]
    lehmer_intro = inspect.cleandoc(_lehmer.__doc__ or "").split("\n\n")[1]
    return "\n\n".join(
        [
            _text("encodings", default=_spec_tables.default_encodings()),
            "### Id encodings",
            table(cols, _spec_tables.encoding_rows("ids")),
            _text("id_decoding"),
            "### The Lehmer code of `sorted`",
            " ".join(lehmer_intro.split()),
            _lehmer_example(),
            "### Value encodings",
            table(cols, _spec_tables.encoding_rows("values")),
            table(
                ["encoding", "value_params", "range below the top-1 (nats)", "error"],
                _spec_tables.quantizer_rows(),
            ),
            _text("value_decoding", f16_max=encodings._F16_MAX, bf16_max=encodings._BF16_MAX),
            _q_example(),
            "### Compact samples (format 3.0)",
            _text("compact_samples"),
            table(cols, _spec_tables.sample_value_rows()),
        ]
    )


def _lehmer_example() -> str:
    ids = np.array([[50, 10, 30, 20]])
    stored = TopkEncoding("sorted", "float32").encode(ids, np.zeros((1, 4), np.float32), 64)
    return _text(
        "lehmer_example",
        ids=ids[0].tolist(),
        ascending=sorted(ids[0].tolist()),
        gaps=stored["topk_id_gaps"][0].tolist(),
        slots=np.argsort(np.argsort(ids[0])).tolist(),
        digits=stored["topk_id_lehmer"][0].tolist(),
    )


def _q_example() -> str:
    enc = TopkEncoding("uint16", "q8c")
    exact = np.array([[-0.05, -0.8, -2.5, -9.0]], np.float32)
    stored = enc.encode(np.array([[3, 1, 4, 2]]), exact, 8)
    _, decoded = enc.decode(stored)
    return _text(
        "q_example",
        exact=", ".join(str(x) for x in exact[0]),
        top1=", ".join(str(x) for x in stored["topk_logprob_top1"]),
        diffs=stored["topk_logprob_codes"][0].tolist(),
        codes=np.cumsum(stored["topk_logprob_codes"][0]).tolist(),
        decoded=", ".join(f"{x:.4f}" for x in decoded[0]),
    )


def _arrow_shards(w: Written) -> str:
    return "\n\n".join(
        [
            _text("arrow", level=_arrow._ZSTD_LEVEL, key=backend.IDENTITY_KEY),
            table(["column", "Arrow type"], _spec_tables.arrow_rows()),
        ]
    )


def _zarr_shards(w: Written) -> str:
    chain, shuffles = _spec_tables.zarr_codecs(w.zarr_arrays)
    files = [p for p in w.trees["zarr"] if "/topk_ids/" in p or p.endswith(".zarr/")]
    rows = [(f"`{n}`", m["data_type"], shuffles[n]) for n, m in w.zarr_arrays.items()]
    return "\n\n".join(
        [
            _text("zarr", key=backend.IDENTITY_KEY, chunk=_zarr.CHUNK_TOKENS),
            fenced(chain, "text"),
            "The example shard's group, and one array in it:",
            fenced("\n".join(files), "text"),
            table(["array", "dtype", "Blosc shuffle"], rows),
        ]
    )


def _metadata(w: Written) -> str:
    meta = w.metadata["arrow"]
    notes = METADATA_KEYS
    if set(meta) != set(notes) or set(w.metadata["zarr"]) != set(notes):
        raise ValueError(f"shard metadata keys {sorted(meta)} are not the documented {notes}")
    return "\n\n".join(
        [
            _text("metadata", key=backend.IDENTITY_KEY),
            table(["key", "meaning"], [(f"`{k}`", notes[k]) for k in sorted(meta)]),
            "The example Arrow shard's:",
            fenced(json.dumps(meta, indent=2, sort_keys=True), "json"),
        ]
    )


def _manifest(w: Written) -> str:
    parts = [
        _text("manifest", name=cache.MANIFEST, size=manifest.MAX_MANIFEST_BYTES >> 20),
        fenced(manifest.to_json(example_manifest()), "json"),
    ]
    for cls, doc, rows in _spec_tables.manifest_tables(FIELD_NOTES):
        parts += [f"### {cls.__name__}", *([" ".join(doc.split())] if doc else [])]
        parts.append(table(["field", "type", "default", "meaning"], rows))
    parts += ["### Limits", _text("limits")]
    parts.append(table(["limit", "value", "meaning"], _spec_tables.limit_rows(LIMIT_NOTES)))
    return "\n\n".join(parts)


def _commits(w: Written) -> str:
    protocol = _list_apart(inspect.cleandoc(writer.__doc__ or "").split("\n\n", 1)[1])
    return "\n\n".join(
        [
            protocol,
            _text("commits"),
            "### Checksums",
            _text("checksums"),
            _example("checksum", CHECKSUM),
            "### The cache fingerprint",
            _text("fingerprint"),
            _example("fingerprint", FINGERPRINT),
        ]
    )


def _list_apart(text: str) -> str:
    """`text` with blank lines around its numbered list, so Markdown renders it as one."""
    lines, out, inside = text.splitlines(), [], False
    for line in lines:
        numbered = line[:1].isdigit() and line[1:3] == ". "
        if (numbered and not inside) or (inside and not (numbered or line.startswith(" "))):
            out.append("")
        inside = numbered or (inside and line.startswith(" "))
        out.append(line)
    return "\n".join(out)


def _versions(w: Written) -> str:
    docs = attribute_docs(version)
    rows = [
        ("`FORMAT_VERSION`", f"`{version.FORMAT_VERSION}`", docs["FORMAT_VERSION"]),
        ("`READABLE_MAJORS`", f"`{version.READABLE_MAJORS}`", docs["READABLE_MAJORS"]),
    ]
    return "\n\n".join(
        [
            " ".join(inspect.cleandoc(version.__doc__ or "").split("\n\n")[1].split()),
            table(["constant", "value", "meaning"], rows),
            "### What a 2.x cache stores otherwise",
            _text("v2_caches"),
            "### What a 1.x cache lacks",
            _text("old_caches"),
        ]
    )


def _reader(w: Written) -> str:
    lines = len(READER.strip().splitlines())
    return "\n\n".join(
        [
            _text("reader", lines=lines),
            _example("reader", READER),
            _text("reader_after"),
        ]
    )


def _interop(w: Written) -> str:
    parts = [_text("interop"), _example("setup", SETUP)]
    for name, (title, about, code) in INTEROP.items():
        parts += [f"### {title}", about, _example(name, code)]
    return "\n\n".join(parts)


SECTIONS: tuple[tuple[str, Callable[[Written], str]], ...] = (
    ("Directory layout", _directory),
    ("Records", _records),
    ("Stored columns", _stored),
    ("Top-k encodings", _encodings),
    ("Arrow IPC shards", _arrow_shards),
    ("Zarr v3 shards", _zarr_shards),
    ("Shard metadata", _metadata),
    ("The manifest", _manifest),
    ("Commit protocol and checksums", _commits),
    ("Versions", _versions),
    ("Decoding a shard without kdcache", _reader),
    ("Reading a cache without kdcache", _interop),
)


def render() -> str:
    """The whole of FORMAT.md."""
    written = write_examples()
    contents = "\n".join(f"{i}. [{t}]({anchor(t)})" for i, (t, _) in enumerate(SECTIONS, 1))
    parts = [
        f"# The kdcache cache format, version {version.FORMAT_VERSION}",
        _text("header", command=REGENERATE),
        _text("intro", reader=anchor(SECTIONS[-2][0]), interop=anchor(SECTIONS[-1][0])),
        contents,
    ]
    parts += [f"## {title}\n\n{section(written)}" for title, section in SECTIONS]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.spec", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"rewrite {FORMAT_MD.name}")
    group.add_argument("--check", action="store_true", help=f"exit 1 if {FORMAT_MD.name} is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        FORMAT_MD.write_text(text, encoding="utf-8")
    elif args.check:
        if not FORMAT_MD.is_file() or FORMAT_MD.read_text(encoding="utf-8") != text:
            print(f"{FORMAT_MD} is out of date; run: {REGENERATE}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
