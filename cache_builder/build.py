"""`build(cfg)`: run a teacher over a dataset into a cache.

dataset -> tokens -> segments -> plan (shards, fingerprint)
per shard of this rank: packed batches -> teacher forward -> top-k & friends on the device
                        -> pinned host copy -> records -> shard writer (worker thread)
                        -> seal -> commit record -> move into shards/
rank 0: manifest marked complete once every shard is committed
"""

from __future__ import annotations

import posixpath
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from cache_builder.config import BuildConfig, parse_max_memory
from cache_builder.data import PackedBatch, Segment, load_rows, pack, segments, tokenize_rows
from cache_builder.distributed import Ranks
from cache_builder.draft import draft_manifest, encoding_for, tokenizer_files
from cache_builder.loading import load_teacher
from cache_builder.pipeline import WriterThread, records_from, to_host
from cache_builder.plan import BuildPlan, ShardPlan, make_plan, segments_of
from cache_builder.rows import BadRows
from cache_builder.teacher import Teacher
from cache_builder.tokenizer import load_tokenizer
from cache_builder.topk import SignalOptions, TeacherSignals
from schemas.cache import COMMITS, TOKENIZER_DIR
from schemas.errors import ConfigError, KdcacheError
from schemas.fingerprint import StreamHasher
from schemas.lock import CacheLock, torchrun_job
from schemas.storage import join, public_location
from schemas.writer import CacheWriter, check_output


@dataclass(frozen=True)
class BuildResult:
    url: str
    tokens: int
    shards: int
    nbytes: int
    seconds: float
    written_tokens: int
    """Tokens this run (this rank) sent through the teacher; 0 when the cache was complete."""
    already_complete: bool = False
    rank: int = 0
    """Which torchrun rank this is; only rank 0 finalises the cache and knows its size."""
    skipped: str = ""
    """What --skip-bad-rows left out (`BadRows.report`), or "" for nothing."""

    @property
    def tokens_per_s(self) -> float:
        return self.written_tokens / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        return f"{self._summary()}; {self.skipped}" if self.skipped else self._summary()

    def _summary(self) -> str:
        if self.already_complete:
            return f"{self.url} is already complete: {self.shards} shards, {self.tokens} tokens. Nothing to do."
        if self.rank:
            return (
                f"rank {self.rank}: {self.written_tokens} tokens through the teacher in "
                f"{self.seconds:.1f} s ({self.tokens_per_s:,.0f} tokens/s); rank 0 finalises {self.url}"
            )
        bpt = self.nbytes / self.tokens if self.tokens else 0.0
        return (
            f"built {self.url}: {self.tokens} tokens in {self.shards} shards, {bpt:.1f} bytes/token; "
            f"{self.written_tokens} tokens through the teacher in {self.seconds:.1f} s "
            f"({self.tokens_per_s:,.0f} tokens/s)"
        )


def build(cfg: BuildConfig) -> BuildResult:
    """Build (or resume, or confirm) the cache `cfg.out` describes."""
    # A bad scheme, or a directory of other files, fails now: before the lock, the data pass
    # and the teacher load.
    check_output(cfg.out, overwrite=cfg.overwrite, **cfg.storage_options)
    start = time.perf_counter()
    ranks = Ranks.from_env(tp=cfg.tp)
    if cfg.device_map is not None and ranks.world_size > 1:
        raise ConfigError(
            f"--device-map runs the teacher as one process over this node's GPUs, but this run "
            f"has {ranks.world_size} processes",
            hint="run it without torchrun, or split the teacher over ranks with --tp",
        )
    say = _say if ranks.is_main else _quiet
    lock: CacheLock | None = None
    try:
        if ranks.is_main:
            # Before anything slow: a second build on --out refuses in seconds, not after the
            # data pass and the teacher load. The other ranks join it after the first barrier.
            lock = CacheLock.acquire(
                cfg.out,
                command="kdcache build",
                job=torchrun_job(),
                break_lock=cfg.break_lock,
                notify=say,
                **cfg.storage_options,
            )
        teacher_name, teacher_label, dataset, dataset_label, read_split = _resolve_defaults(
            cfg, say
        )
        tokenizer, notes = load_tokenizer(
            teacher_name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
        )
        for note in notes:
            say(note)
        # Documents longer than the model's context are windowed below, so transformers'
        # "sequence length is longer than the specified maximum" warning does not apply.
        tokenizer.model_max_length = sys.maxsize

        def stream(bad: BadRows) -> Iterator[Segment]:
            rows = load_rows(
                dataset,
                split=read_split,
                text_field=cfg.text_field,
                chat_template=cfg.chat_template,
                max_rows=cfg.max_documents,  # None: all of them
                bad_rows=bad,
            )
            docs = tokenize_rows(
                rows,
                tokenizer,
                text_field=cfg.text_field,
                chat_template=cfg.chat_template,
                bad_rows=bad,
            )
            return segments(docs, cfg.max_length, source=dataset_label, bad_rows=bad)

        skipped = BadRows(skip=cfg.skip_bad_rows)  # what the data pass left out
        plan, data_info = _plan(stream(skipped), cfg, dataset_label)
        if skipped.report():
            say(skipped.report())
        # The teacher loads after the data pass, so a bad dataset fails in seconds.
        teacher = load_teacher(
            teacher_name,
            revision=cfg.revision,
            dtype=cfg.dtype,
            device=_device(cfg.device, ranks),
            attn_implementation=cfg.attn_implementation,
            trust_remote_code=cfg.trust_remote_code,
            tp=cfg.tp,
            device_map=cfg.device_map,
            max_memory=parse_max_memory(cfg.max_memory) if cfg.max_memory else None,
            hash_weights=ranks.is_writer,  # only a group's writer opens the cache
        )
        encoding = encoding_for(cfg, teacher.vocab_size)
        tokenizer_bytes = tokenizer_files(tokenizer)
        parallel = dict(
            tp=ranks.tp, dp=ranks.dp_size, world_size=ranks.world_size, device_map=cfg.device_map
        )
        draft = draft_manifest(
            cfg,
            teacher,
            teacher_label,
            tokenizer,
            tokenizer_bytes,
            data_info,
            encoding,
            skipped,
            parallel,
        )

        # Rank 0 creates (or checks, or replaces) the cache before anyone writes into it.
        writer = (
            CacheWriter(
                cfg.out,
                draft,
                overwrite=cfg.overwrite,
                owner=True,
                lock=lock,
                **cfg.storage_options,
            )
            if ranks.is_main
            else None
        )
        if writer is not None:
            _remove_stale_temporaries(writer)
            _check_resumed_layout(writer, cfg)
        ranks.barrier()
        if writer is None and ranks.is_writer:
            lock = CacheLock.join(cfg.out, job=torchrun_job(), **cfg.storage_options)
            writer = CacheWriter(cfg.out, draft, owner=False, lock=lock, **cfg.storage_options)
        complete = ranks.share_in_group(writer is not None and writer.complete)
        if complete:
            m = writer.existing if writer is not None else None
            return BuildResult(
                cfg.out,
                m.num_tokens if m else plan.num_tokens,
                len(m.shards) if m else len(plan.shards),
                m.nbytes if m else 0,
                time.perf_counter() - start,
                0,
                True,
                rank=ranks.rank,
                skipped=skipped.report(),
            )
        if ranks.is_main:
            # Rewritten on every run (it is small), each file atomically: a crash mid-copy is
            # repaired by the rerun.
            writer.store_tokenizer(tokenizer_bytes)

        mine = plan.for_rank(ranks.dp_rank, ranks.dp_size)
        todo_indices = None
        if writer is not None:  # the group's writer decides; its TP peers follow
            writer.recover({s.index for s in mine})  # a move a killed run began
            writer.remove_temporaries({s.index for s in mine})
            committed = writer.committed()
            todo_indices = [s.index for s in mine if s.index not in committed]
        todo_indices = ranks.share_in_group(todo_indices)
        todo = [s for s in mine if s.index in set(todo_indices)]
        if len(todo) < len(mine):
            say(f"resuming: {len(mine) - len(todo)} of {len(mine)} shards are already committed")
        again = stream(BadRows(skip=cfg.skip_bad_rows))  # skips the same rows: same stream
        written = _run(cfg, teacher, writer, todo, again, ranks, pad_id=tokenizer.pad_token_id)
        ranks.barrier()
        if not ranks.is_main:
            return BuildResult(
                cfg.out,
                plan.num_tokens,
                len(plan.shards),
                0,
                time.perf_counter() - start,
                written,
                rank=ranks.rank,
                skipped=skipped.report(),
            )
        manifest = writer.finalize(len(plan.shards))
        return BuildResult(
            cfg.out,
            manifest.num_tokens,
            len(manifest.shards),
            manifest.nbytes,
            time.perf_counter() - start,
            written,
            skipped=skipped.report(),
        )
    except OSError as exc:
        where = exc.filename or cfg.out
        raise KdcacheError(
            f"I/O error at {where} while building {cfg.out}: {exc.strerror or exc}",
            hint="check the path, free space and permissions; re-running the same command "
            "resumes from the last committed shard",
        ) from exc
    finally:
        if lock is not None:
            lock.release()
        ranks.close()


def _run(
    cfg: BuildConfig,
    teacher: Teacher,
    writer: CacheWriter | None,
    todo: list[ShardPlan],
    stream: Iterator[Segment],
    ranks: Ranks,
    *,
    pad_id: int,
) -> int:
    """Send this rank's unfinished shards through the teacher; returns the tokens processed.

    Every rank of a tensor-parallel group runs every batch (each computes its share of the
    teacher); only the group's writer (`writer` not None) encodes and writes the signals.
    """
    bar = tqdm(
        total=sum(s.num_tokens for s in todo),
        unit="tok",
        unit_scale=True,
        desc=f"build group {ranks.dp_rank}" if ranks.dp_size > 1 else "build",
        disable=not cfg.progress or not ranks.is_main,
        dynamic_ncols=True,
    )
    worker = WriterThread(depth=3)
    done = 0
    try:
        with torch.inference_mode():
            for shard, segs in segments_of(stream, todo):
                out = writer.shard_writer(shard.index) if writer is not None else None
                # Per shard (a resumed build draws the same), per TP rank (independent draws
                # within each rank's vocabulary slice); TP rank 0 draws as a one-rank build.
                seed = (cfg.seed * 1_000_003 + shard.index + ranks.tp_rank * _RANK_STRIDE) % (
                    1 << 63
                )
                generator = torch.Generator(device=teacher.signals_device).manual_seed(seed)
                for b, batch in enumerate(
                    pack(segs, cfg.max_length, pad_id=pad_id, batch_tokens=cfg.batch_tokens)
                ):
                    signals = _forward(cfg, teacher, batch, generator)
                    bar.update(batch.num_tokens)
                    done += batch.num_tokens
                    if out is None:
                        continue
                    host = to_host(signals)
                    # Bind everything by value: the main thread moves on to the next shard
                    # while this job still waits on the writer thread.
                    worker.submit(
                        lambda out=out, host=host, batch=batch, s=shard.index, b=b: out.write(
                            records_from(host.numpy(), batch, shard=s, batch_index=b)
                        )
                    )
                if out is not None:
                    worker.submit(lambda out=out: writer.commit_shard(out))
            worker.drain()
    finally:
        worker.close()
        bar.close()
    return done


_RANK_STRIDE = 0x9E3779B97F4A7C15  # spreads the TP ranks' generator seeds far apart


def _check_resumed_layout(writer: CacheWriter, cfg: BuildConfig) -> None:
    """Refuse to resume a sampled cache under another --tp: draws depend on the vocabulary split.

    Top-k, lse, tail and label log-probs are the same under any split (to float rounding), so
    without samples any --tp or world size may resume any build.
    """
    old = writer.existing
    if old is None or not cfg.samples:
        return
    was = int(old.build.config.get("tp", 1))
    if was != cfg.tp and writer.committed():
        raise ConfigError(
            f"{cfg.out} was begun with --tp {was} and holds sampled tokens (--samples "
            f"{cfg.samples}); the draws depend on how the vocabulary is split over ranks, so "
            f"resuming with --tp {cfg.tp} would mix two samplings",
            hint=f"resume with --tp {was}, or pass --overwrite to rebuild with --tp {cfg.tp}",
        )


def _forward(
    cfg: BuildConfig, teacher: Teacher, batch: PackedBatch, generator: torch.Generator
) -> TeacherSignals:
    """Teacher signals at every non-padding position of `batch`, on the device."""
    dev = teacher.device
    input_ids = torch.from_numpy(batch.input_ids).to(dev, non_blocking=True)  # (B, L)
    # Position ids restarting per document come from seq_lens inside the teacher.
    hidden = teacher.hidden_states(input_ids, None, batch.seq_lens)  # (B, L, d)
    # Flat indices of real tokens, computed on the host: boolean masking on the device would sync.
    lengths = np.array([sum(row) for row in batch.seq_lens])
    flat = np.flatnonzero(np.arange(batch.input_ids.shape[1])[None, :] < lengths[:, None])
    out = hidden.device  # with a device map: the last layer's device, not the embedding's
    index = torch.from_numpy(flat).to(out, non_blocking=True)  # (N,)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (N, d)
    labels = torch.from_numpy(batch.labels.reshape(-1)[flat]).to(out, non_blocking=True)  # (N,)
    options = SignalOptions(
        k=cfg.top_k,
        temperatures=cfg.temperatures,
        num_samples=cfg.samples,
        sample_temperature=cfg.sample_temperature,
        compact_samples=True,
        vocab_chunk=cfg.vocab_chunk,
    )
    return teacher.signals(h, labels, options, generator=generator)


def _plan(stream: Iterator[Segment], cfg: BuildConfig, label: str) -> tuple[BuildPlan, dict]:
    """One pass over the token stream: its fingerprint and the shard boundaries."""
    hasher = StreamHasher()
    lengths = []
    for seg in stream:
        hasher.update(seg.source_row, seg.input_ids, seg.source_start)
        lengths.append(len(seg))
    plan = make_plan(lengths, cfg.shard_tokens)
    info = dict(
        source=public_location(label),
        split=cfg.split,
        text_field=cfg.text_field,
        fingerprint=hasher.hexdigest(),
        num_documents=hasher.num_documents,
        num_tokens=hasher.num_tokens,
    )
    return plan, info


def _remove_stale_temporaries(writer: CacheWriter) -> None:
    """Delete the `.tmp-*` files of atomic writes that a killed run left half-done.

    The owner does this before any rank writes. One left in commits/ would otherwise be read as
    a commit on resume. (Shard temporaries are each rank's own: `remove_temporaries`.)
    """
    for folder in (writer.root, join(writer.root, COMMITS), join(writer.root, TOKENIZER_DIR)):
        if not writer.fs.isdir(folder):
            continue
        for path in writer.fs.ls(folder, detail=False):
            if posixpath.basename(path.rstrip("/")).startswith(".tmp-"):
                writer.fs.rm(path, recursive=True)


def _resolve_defaults(cfg: BuildConfig, say) -> tuple[str, str, str, str, str]:
    """(teacher, teacher label, dataset path, dataset label, split to read), falling back to
    the embedded default. Labels are what the manifest records. The embedded corpus is one
    jsonl file per split, in this process's memory (so builds at once share no file), and a
    file holds one split ("train"), so the split asked for decides the file and "train" is
    what is read from it."""
    teacher, dataset, label, read_split = cfg.teacher, cfg.dataset, cfg.dataset, cfg.split
    teacher_label = public_location(teacher) if teacher is not None else ""
    if teacher is None or dataset is None:
        from cache_builder import default

        if teacher is None:
            teacher = str(default.DEFAULT_TEACHER_DIR)
            teacher_label = "embedded:python-docs-teacher"
            say(f"no --teacher given: using the embedded default teacher ({teacher})")
        if dataset is None:
            dataset = default.default_dataset_url(cfg.split)  # in memory: no file to share
            label, read_split = f"embedded:python-docs:{cfg.split}", "train"
            say(
                f"no --dataset given: using the embedded default corpus, split {cfg.split} "
                "(Python's own documentation)"
            )
    return teacher, teacher_label, dataset, label or dataset, read_split


def _device(name: str, ranks: Ranks) -> str:
    if name != "auto":
        return name
    return f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"


def _say(message: str) -> None:
    print(f"kdcache: {message}", file=sys.stderr, flush=True)


def _quiet(message: str) -> None:
    """What ranks other than 0 say: nothing (rank 0 speaks for the build)."""
