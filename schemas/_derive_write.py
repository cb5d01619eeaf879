"""The second pass of `schemas.derive`: writing one derived cache from its plan.

The plan is a list of `Take`s, one per output shard, each naming the sequences it keeps of a
source shard that the first pass scanned. The draft manifest is computed from the plan before
any shard is written, so every rewritten shard carries the derived cache's fingerprint; then
each take is moved over (`schemas._transfer`) through the commit protocol of `CacheWriter`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from schemas._transfer import rewrite, take_over
from schemas.cache import Cache
from schemas.fingerprint import config_fingerprint
from schemas.lock import CacheLock
from schemas.manifest import DatasetInfo, Derivation, Manifest, ShardInfo, SourceCache
from schemas.storage import public_location
from schemas.writer import CacheWriter, check_output


@dataclass(frozen=True, eq=False)
class Scanned:
    """One source shard's per-sequence facts, from the first pass: its cache's position among
    the sources, and (S,) content keys, window starts (0: a document's first) and lengths."""

    source: int
    info: ShardInfo
    keys: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray


@dataclass(frozen=True, eq=False)
class Take:
    """One output shard: the sequences `kept` (positions, in order) of a source shard; None
    keeps the whole shard, which is then taken over unchanged."""

    shard: Scanned
    kept: np.ndarray | None = None

    def _picked(self, values: np.ndarray) -> np.ndarray:
        return values if self.kept is None else values[self.kept]

    @property
    def tokens(self) -> int:
        return int(self._picked(self.shard.lengths).sum())

    @property
    def documents(self) -> int:
        return int(np.count_nonzero(self._picked(self.shard.starts) == 0))


@dataclass(frozen=True)
class Derived:
    """One cache a derivation wrote: its size, and how this run put its shards there."""

    url: str
    tokens: int
    documents: int
    shards: int
    moved: dict[str, int] = dataclasses.field(default_factory=dict)
    """Shards by how: "linked" (hard links), "copied" (by the store, or across devices),
    "rewritten", "already there" (committed by a killed earlier run)."""
    already_complete: bool = False

    def brief(self) -> str:
        how = ", ".join(f"{n} {what}" for what, n in self.moved.items() if n) or "empty"
        how = "already complete, nothing to do" if self.already_complete else how
        return (
            f"{self.tokens:,} tokens, {self.documents:,} documents in {self.shards} shards ({how})"
        )


def write_derived(
    url: str,
    operation: str,
    sources: list[Cache],
    options: dict[str, Any],
    takes: list[Take],
    overwrite: bool,
    lock: CacheLock,
    storage_options: dict[str, Any],
) -> Derived:
    """Write (or resume, or confirm) the derived cache at `url`, holding `lock` on it: one
    output shard per take."""
    draft = _draft(operation, sources, options, takes)
    check_output(url, overwrite=overwrite, **storage_options)
    writer = CacheWriter(url, draft, overwrite=overwrite, lock=lock, **storage_options)
    size = (url, draft.dataset.num_tokens, draft.dataset.num_documents, len(takes))
    if writer.complete:
        return Derived(*size, already_complete=True)
    writer.recover()
    writer.remove_temporaries()
    if files := draft.tokenizer.files:
        with sources[0].tokenizer_files() as folder:
            data = {}
            for f in files:
                with open(os.path.join(folder, f.name), "rb") as fh:
                    data[f.name] = fh.read()
        writer.store_tokenizer(data)
    committed = writer.committed()
    moved = {"linked": 0, "copied": 0, "rewritten": 0, "already there": 0}
    for index, take in enumerate(takes):
        if index in committed:
            moved["already there"] += 1
            continue
        source, info = sources[take.shard.source], take.shard.info
        if take.kept is None:
            _, how = take_over(source, info, writer, index)
        else:
            rewrite(source, info, take.kept, writer, index)
            how = "rewritten"
        moved[how] += 1
    writer.finalize(len(takes))
    return Derived(*size, moved)


def _draft(
    operation: str, sources: list[Cache], options: dict[str, Any], takes: list[Take]
) -> Manifest:
    """The derived cache's manifest minus its shards: the first source's settings, a dataset
    fingerprinted from the operation, the sources' token streams and the options."""
    datasets = [c.manifest.dataset for c in sources]
    first = datasets[0]

    def common(attr: str) -> Any:
        value = getattr(first, attr)
        return value if all(getattr(d, attr) == value for d in datasets) else None

    n = len(sources)
    what = {"operation": operation, "sources": [d.fingerprint for d in datasets]}
    part = f" ({options['part']} part)" if "part" in options else ""
    dataset = DatasetInfo(
        source=f"{operation} of {n} cache{'s' if n > 1 else ''}{part}",
        split=common("split"),
        text_field=common("text_field"),
        fingerprint=config_fingerprint({**what, "options": options}),
        num_documents=sum(t.documents for t in takes),
        num_tokens=sum(t.tokens for t in takes),
    )
    derived = Derivation(
        operation=operation,
        sources=tuple(
            SourceCache(
                url=public_location(c.url),
                fingerprint=c.manifest.fingerprint,
                dataset_fingerprint=c.manifest.dataset.fingerprint,
            )
            for c in sources
        ),
        options=options,
    )
    # The sources share one teacher (merge checks it), so its quantization record carries over.
    kept = {k: v for k, v in sources[0].manifest.extensions.items() if k == "teacher_quantization"}
    return dataclasses.replace(
        sources[0].manifest, dataset=dataset, derived=derived, fidelity=None, extensions=kept
    )
