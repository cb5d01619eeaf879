"""Moving a source shard into a derived cache (`schemas.derive`): whole, or in part.

A shard kept whole is *taken over*: its bytes are put under the new cache unchanged, as
cheaply as the stores allow (a hard link on a local filesystem, a copy on the store's own side
on an object store or memory://, a streamed copy between two different stores). Its own
metadata still names the cache it was written for, so the new manifest lists it with
`origin`/`origin_index` (`Cache.expected_identity` checks those), and it keeps its fidelity.

A shard kept in part is *rewritten*: the kept sequences' stored columns are written again
without decoding, so the records stay bit for bit what the build wrote, under the new cache's
identity.

Both follow the commit protocol of `schemas.writer`: staged under `staging/`, committed, then
moved into `shards/`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import posixpath
import shutil
import uuid

import numpy as np
from fsspec import AbstractFileSystem

from schemas.backend import STAGING_DIR, shard_name
from schemas.cache import Cache
from schemas.errors import CacheCorruptError
from schemas.fidelity import ShardFidelity
from schemas.manifest import ShardInfo
from schemas.storage import is_local, join
from schemas.writer import CacheWriter

_NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}
"""Why a hard link can fail where a copy works: another device, a filesystem without links,
too many links to one file."""


def take_over(
    source: Cache, info: ShardInfo, writer: CacheWriter, index: int
) -> tuple[ShardInfo, str]:
    """Put source shard `info`, bytes unchanged, into `writer`'s cache as shard `index`, and
    commit it. Returns its entry and how the bytes got there: "linked" or "copied"."""
    suffix = writer.backend.writer.suffix
    staged = join(writer.root, STAGING_DIR, f"{index:06d}-{uuid.uuid4().hex[:8]}{suffix}")
    try:
        how = transfer(source.fs, join(source.root, info.name), writer.fs, staged)
        listed = dataclasses.replace(
            info,
            name=shard_name(index, suffix),
            index=index,
            # The shard's metadata names the cache it was first written for, even through a
            # chain of derivations (a subset of a merge).
            origin=info.origin or source.manifest.fingerprint,
            origin_index=info.index if info.origin_index is None else info.origin_index,
        )
        writer.commit(listed, staged=staged)
    except BaseException:
        if writer.fs.exists(staged):
            writer.fs.rm(staged, recursive=True)
        raise
    return listed, how


def transfer(src_fs: AbstractFileSystem, src: str, dst_fs: AbstractFileSystem, dst: str) -> str:
    """Copy the file or folder `src` to `dst` as cheaply as the stores allow; say how."""
    if src_fs.isfile(src):
        pairs = [(src, dst)]
    else:
        files = sorted(src_fs.find(src, withdirs=False))
        pairs = [(f, join(dst, posixpath.relpath(f, src))) for f in files]
    local = is_local(src_fs) and is_local(dst_fs)
    if local:
        _refuse_links(src)
    how = "linked" if local else "copied"
    for a, b in pairs:
        if local:
            os.makedirs(os.path.dirname(b), exist_ok=True)
            try:
                os.link(a, b, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINK:
                    raise
                shutil.copyfile(a, b, follow_symlinks=False)
                how = "copied"
        elif src_fs == dst_fs:
            dst_fs.copy(a, b)  # on an object store, a copy on the store's side
        else:
            dst_fs.makedirs(posixpath.dirname(b), exist_ok=True)
            with src_fs.open(a, "rb") as fa, dst_fs.open(b, "wb") as fb:
                shutil.copyfileobj(fa, fb, 1 << 22)
    return how


def _refuse_links(path: str) -> None:
    """Raise `CacheCorruptError` if local `path`, or anything below it, is a symbolic link: a
    hard link to it would carry whatever it points at into the new cache."""
    below = (os.path.join(top, n) for top, dirs, files in os.walk(path) for n in dirs + files)
    for entry in (path, *below):
        if os.path.islink(entry):
            raise CacheCorruptError(
                f"{entry} is a symbolic link; kdcache never follows links inside a cache",
                hint="restore the shard from the cache's producer",
            )


def rewrite(
    source: Cache, info: ShardInfo, kept: np.ndarray, writer: CacheWriter, index: int
) -> ShardInfo:
    """Write sequences `kept` (positions, in order) of source shard `info`, in their stored
    form, as shard `index`, and commit it with its fidelity derived from the source's."""
    stored = source.reader(info).read_stored().select(kept)
    lengths = np.diff(stored.seq_offsets)
    labels = int(lengths.sum() - np.count_nonzero(lengths))
    tail = float(np.exp(stored.tokens["log_tail"].astype(np.float64)).sum())
    with writer.shard_writer(index) as w:
        w.write_stored(stored)
        fidelity = kept_fidelity(info.fidelity, labels, tail, stored.num_tokens)
        return writer.commit_shard(w, fidelity=fidelity)


def kept_fidelity(
    f: ShardFidelity | None, labels: int, tail_mass: float, positions: int
) -> ShardFidelity | None:
    """The fidelity sums of the `kept` part of a shard whose sums are `f`.

    Exact where the stored columns allow: positions, label positions (`labels`, all but each
    sequence's last) and the tail mass (`tail_mass`, from log_tail, stored exactly). Scaled to
    the kept share of `positions` where they do not (the stored values are already encoded):
    top-k entropy, label hits, the sampled positions and their KL. The worst encoding error is
    the source shard's, an upper bound.
    """
    if f is None or f.positions == 0:
        return f
    share = positions / f.positions
    sampled = round(f.sampled_positions * share)
    return ShardFidelity(
        positions=positions,
        tail_mass_sum=tail_mass,
        topk_entropy_sum=f.topk_entropy_sum * share,
        label_positions=labels,
        label_in_topk=min(labels, round(f.label_in_topk * labels / max(f.label_positions, 1))),
        sampled_positions=sampled,
        max_abs_logprob_error=f.max_abs_logprob_error,
        topk_kl_sum=f.topk_kl_sum * sampled / f.sampled_positions if f.sampled_positions else 0.0,
    )
