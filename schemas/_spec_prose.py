"""The hand-written prose of schemas/FORMAT.md, and the meanings the code does not yet state.

`SECTION_TEXT` explains; every table and example next to it is computed by `schemas.spec`.
Entries are `str.format` templates (literal braces doubled). `FIELD_NOTES` and `LIMIT_NOTES`
stand in for attribute docstrings missing from `schemas.manifest`, `schemas.record`,
`schemas.fidelity` and `schemas._jsonparse`: the generator refuses a note for a field that has
a docstring, so once the code documents a field, its note must go.
"""

from __future__ import annotations

METADATA_KEYS = {
    "format_version": "the format version the shard was written in",
    "cache_fingerprint": "the [fingerprint](#the-cache-fingerprint) of the cache the shard "
    "was written for: the manifest's, or the `origin` of its `shards` entry (a shard that "
    "`kdcache merge`, `split` or `subset` took over unchanged)",
    "shard_index": "its index in that cache: `index`, or `origin_index` when set",
    "layout": "the manifest's `layout`",
    "encoding": "the id and value encoding names, and for q8, q8c and q8c-coarse their "
    "`value_params`",
}
"""Every key of a shard's own metadata (the generator refuses a key missing here)."""

FIELD_NOTES = {
    "Manifest.schema_version": "The format version, `major.minor` ([Versions](#versions)).",
    "Manifest.format": "How every shard is stored: `arrow` or `zarr`.",
    "Manifest.status": "`building` while shards are committed, `complete` once all are.",
    "Manifest.created_by": "The program that wrote the cache, with its version.",
    "Manifest.teacher": "The teacher model.",
    "Manifest.tokenizer": "The tokenizer: equal fingerprints, equal token ids.",
    "Manifest.dataset": "The data the cache was built from.",
    "Manifest.build": "The settings of the build.",
    "Manifest.layout": "The sizes that shape every shard ([Records](#records)).",
    "Manifest.shards": "The committed shards, by index: only these are part of the cache.",
    "TeacherInfo.name_or_path": "Hub id or name of the teacher (a local path is recorded by "
    "its last component only).",
    "TeacherInfo.revision": "Hub revision, when known.",
    "TeacherInfo.model_type": "`model_type` of its configuration, e.g. `llama`.",
    "TeacherInfo.dtype": "The dtype its forward ran in.",
    "TeacherInfo.num_parameters": "Its parameter count.",
    "TokenizerInfo.name_or_path": "Hub id or name of the tokenizer.",
    "TokenizerInfo.vocab_size": "Its vocabulary size.",
    "TokenizerInfo.bos_token_id": "Special token id (null: none).",
    "TokenizerInfo.eos_token_id": "Special token id (null: none).",
    "TokenizerInfo.pad_token_id": "Special token id (null: none).",
    "DatasetInfo.source": "Where the data came from: a hub id, a URL or a file name, never a "
    "local path.",
    "DatasetInfo.split": "The split read.",
    "DatasetInfo.text_field": "The field the text was read from.",
    "DatasetInfo.num_documents": "Documents tokenised.",
    "DatasetInfo.num_tokens": "Token positions in the cache (the shards' add up to it).",
    "BuildSettings.top_k": "The k the build was asked for.",
    "BuildSettings.max_length": "Tokens per sequence at most; longer documents are windowed.",
    "BuildSettings.packing": "How documents share a sequence.",
    "BuildSettings.num_samples": "Draws per position for `sample_ids` (0: none).",
    "BuildSettings.sample_temperature": "The temperature the samples were drawn at.",
    "BuildSettings.temperatures": "The extra temperatures of `temp_lse`.",
    "BuildSettings.dtype": "The dtype the teacher ran in.",
    "BuildSettings.seed": "The seed of the sampling.",
    "BuildSettings.shard_tokens": "Token positions per shard aimed at (shards hold whole "
    "sequences).",
    "Layout.k": "Top-k ids and log-probabilities per position.",
    "Layout.vocab_size": "The vocabulary size V: every stored id is < V.",
    "Layout.temperatures": "The extra temperatures T of `temp_lse`, in its column order.",
    "Layout.num_samples": "Draws per position, and slots per position of `sample_ids` (0: none).",
    "Fidelity.positions": "Token positions measured (all of the cache's).",
    "Fidelity.mean_topk_entropy_nats": "Mean entropy of the renormalised top-k.",
    "Fidelity.encoding_sampled_positions": "Positions encoded and decoded to measure the "
    "encoding's error.",
    "FileInfo.nbytes": "Its size in bytes.",
    "ShardInfo.index": "The shard's index (its name holds it in six digits).",
    "ShardInfo.num_tokens": "Token positions (N) in the shard.",
    "ShardInfo.num_sequences": "Sequences (S) in the shard.",
    "ShardInfo.nbytes": "Its size in bytes: the file's (Arrow) or the sum of the group's files "
    "(Zarr).",
    "ShardFidelity.positions": "Token positions of the shard.",
    "ShardFidelity.tail_mass_sum": "Sum of exp(log_tail).",
    "ShardFidelity.label_in_topk": "Positions whose next token is in the top-k.",
    "ShardFidelity.sampled_positions": "Positions measured for the encoding's error.",
    "ShardFidelity.max_abs_logprob_error": "Largest |decoded - exact| log-probability seen.",
    "ShardFidelity.topk_kl_sum": "Sum of KL(exact renormalised top-k || decoded), nats.",
    "Derivation.operation": "`merge`, `split` or `subset`.",
    "Derivation.sources": "The caches it was made from.",
    "Derivation.options": "The options it ran with.",
    "SourceCache.fingerprint": "The source cache's fingerprint.",
    "SourceCache.dataset_fingerprint": "Its dataset fingerprint.",
}
"""Meanings of manifest fields without an attribute docstring ("Class.field")."""

LIMIT_NOTES = {
    "MAX_TOKENIZER_FILE_BYTES": "The largest file of the `tokenizer/` copy.",
    "MAX_VOCAB": "The largest vocabulary size.",
    "MAX_TEMPERATURE": "The largest temperature.",
    "LIST_BOUNDS": "Items at most in these lists (others: `MAX_LIST`).",
}
"""Meanings of limits without an attribute docstring."""

SECTION_TEXT = {
    "header": """
<!-- Generated from the code that defines the format by `{command}`. Do not edit:
tests/schemas/test_format_spec.py fails when this file differs from what the code says. -->
""",
    "intro": """
A kdcache cache holds, for every token position of a dataset, what a student needs of a
teacher's output distribution: the top-k ids and log-probabilities, the log-sum-exp over the
vocabulary, the tail mass, the label's log-probability, and optionally samples and log-sum-exps
at other temperatures. This page is all a reader needs, with or without kdcache: a
[decoder in numpy and pyarrow]({reader}) and [pyarrow, pandas, Polars, DuckDB, `datasets` and
zarr]({interop}) are at the end, and the tests run each of them against kdcache itself. Sizes:
N token positions and S sequences in a shard, k ids per position, T extra temperatures,
V the vocabulary size.
""",
    "directory": """
A cache is a directory, or a prefix on an object store (any fsspec URL: `s3://`, `gs://`,
`memory://`). The example cache of this page, in Arrow:
""",
    "shard_row": "one shard per index (six digits): an Arrow IPC file or a Zarr v3 group; "
    "immutable once the manifest lists it",
    "commit_row": "the commit record of a finished shard: its entry of the manifest's "
    "`shards`, plus `staged`, where it was staged",
    "lock_row": "{what}: its owner (run id, command, host, pid, torchrun job), when it was "
    "taken and its last heartbeat (renewed every tenth of `stale_after`, in seconds). Not part "
    "of the cache: a reader ignores it; a writer refuses while it is fresh and takes it over "
    "once its heartbeat is older than `stale_after`. Absent when no writer runs, or left by a "
    "killed one (so are its temporaries, `.lock-*.tmp`)",
    "tmp_row": "a file being replaced atomically (local disks): not part of the cache",
    "directory_glob": """
`shards/` only ever holds committed shards (each has its record in `commits/`), so a glob over
it never sees a half-written or uncommitted one. Still take the shard list from
`manifest.json` when the cache is `complete`: it is the one list with sizes and checksums.
""",
    "records": """
A shard holds whole sequences. These are the values per token position and per sequence, as a
reader hands them out after decoding; k, T and the number of samples are fixed for the cache
by the manifest's `layout`.
""",
    "records_after": """
From these: a teacher logit is `topk_logprobs + lse`, a probability `exp(topk_logprobs)`,
the probability outside the top-k `exp(log_tail)`, and the log-sum-exp of the logits / T for
T = `layout.temperatures[i]` is `temp_lse[:, i]`. The next token of position t is
`input_ids[t + 1]` in the same sequence.
""",
    "stored": """
On disk the records are in stored form: ids narrowed to the smallest unsigned type that holds
the vocabulary, and the top-k through the cache's encoding (next section). Both storage
formats store exactly these arrays. Per sequence (S values each):
""",
    "stored_tokens": "Per token (the token axis first), stored as they are:",
    "stored_after": """
The top-k ids and log-probabilities are stored in the columns of the cache's encoding. The
sequence offsets: Zarr stores `seq_offsets` (S + 1,) int64; Arrow stores none, since each row
is one sequence.
""",
    "encodings": """
The manifest's `encoding` names one id encoding and one value encoding, `{{"ids": ...,
"values": ...}}`; every shard's metadata repeats them, with the parameters of the value
encoding. A build's default: {default}. Columns whose dtype depends on V or k say so; an
encoding "refused" for a size cannot be used there.
""",
    "id_decoding": """
Decoded ids are exact, in the teacher's rank order (`ids[:, 0]` is the top-1):

- `uint16`, `uint32`: `ids = topk_ids`.
- `sorted`: `ascending = cumsum(topk_id_gaps, axis=1)` is each row's ids in ascending order;
  the Lehmer code in `topk_id_lehmer` gives for each rank r a slot, and `ids[r] =
  ascending[slot[r]]`.
""",
    "lehmer_example": """
To decode a row: start with the slots 0..k-1 all free; for r = 0..k-1, `slot[r]` is the
digit[r]-th (counting from 0) free slot in ascending order, which is then taken. Example: the
rank-ordered ids {ids} are stored as `topk_id_gaps` {gaps} (ascending {ascending}) and
`topk_id_lehmer` {digits}, the code of the slots {slots}.
""",
    "value_decoding": """
Decoded log-probabilities are float32:

- `float32`: as stored.
- `float16`, `bfloat16`: `bits = cumsum(column, axis=1)` in uint16 arithmetic (modulo 2^16);
  the bits are an IEEE half-precision number (float16), or the upper 16 bits of a float32
  whose lower 16 are zero (bfloat16).
- `q8`, `q8c`, `q8c-coarse`: `c = cumsum(topk_logprob_codes, axis=1)`, an integer code
  0..max_code of the distance below the row's top-1; `x(c) = knee * expm1(c * step / knee)`,
  or `c * step` when knee is null, computed in float64 and rounded to float32; then
  `logprob = topk_logprob_top1 - x(c)` in float32. The top-1 is stored exactly.

A writer (`TopkEncoding.encode`) raises the values to at least -{f16_max:g} for float16 and
-{bf16_max:.6g} (the lowest finite bfloat16) for bfloat16, then rounds float16 to nearest
and bfloat16 to nearest even (`(b + 0x7FFF + ((b >> 16) & 1)) >> 16` on the float32 bits b);
for the q formats it takes `x = max(top1 - logprob, 0)` in float64, the code
`c = clip(rint(g(x)), 0, max_code)` with `g(x) = x / step` (knee null) or
`(knee / step) * log1p(x / knee)`, then the running maximum of c along k (no rank decodes
above the one before). Each format stores its bits or codes as differences along k, the
first from 0.
""",
    "q_example": """
Example, `q8c`: the log-probabilities [{exact}] are stored as `topk_logprob_top1` [{top1}]
and `topk_logprob_codes` {diffs} (the codes {codes}), and decode to [{decoded}].
""",
    "arrow": """
A shard is one Arrow IPC **file** (the format with a footer that `pyarrow.ipc.new_file`
writes, also known as Feather v2), `shards/NNNNNN.arrow`, its record batches compressed with
zstd (level {level}). One row per sequence: per-sequence columns are plain; per-token columns
are lists with one item per token of the sequence, and an item with k values (or samples, or
T) is a fixed-size list. A shard has one or more record batches; list offsets are 32-bit.
Each per-token field carries its meaning as field metadata (`meaning`), and the schema
metadata holds the [shard metadata](#shard-metadata) as JSON text under "{key}". The schema of
the example shard (every optional field, the default encoding, V <= 65,536):
""",
    "zarr": """
A shard is one Zarr v3 group, `shards/NNNNNN.zarr/`, with one array per stored column
(per-token and per-sequence) plus `seq_offsets`; the group attribute "{key}" holds the
[shard metadata](#shard-metadata). Each array is chunked along its first axis only, in inner
chunks of min(length, {chunk:,}) rows (`schemas._zarr.CHUNK_TOKENS`, the unit of random
access), packed into a single Zarr shard object whose length is the array's, rounded up to
whole inner chunks. Every chunk is stored, even one equal to the fill value. The codecs of
every array:
""",
    "metadata": """
Every shard carries its own metadata under the key "{key}": JSON text in the Arrow schema
metadata, a group attribute in Zarr. A shard found on its own can be identified and decoded;
kdcache refuses a shard whose metadata disagrees with the manifest.
""",
    "manifest": """
`{name}` is one JSON object of at most {size} MiB. Unknown top-level fields are refused unless
they are objects that say `"must_understand": false`. An example:
""",
    "limits": """
A cache is untrusted input: kdcache refuses a manifest or commit record beyond these bounds,
naming the field.
""",
    "commits": """
In detail: a writer writes a shard under `staging/`, closes it and takes its size and
checksum. Then its commit record `commits/NNNNNN.json` is written: its entry of the
manifest's `shards` plus `"staged"`, the path of the staged copy (`staging/...`). From here on
the shard is committed. Then it is moved to `shards/NNNNNN.<format>` (a rename on a local
disk; on an object store a copy on the store's side, then a delete), and the manifest is
rewritten. A build killed between the record and the end of the move finishes the move when
it is run again (the staged copy is checked against the record's checksum first). Commit
records and every rewrite of `manifest.json` are written in one piece (a local file through a
`.tmp-*` sibling, fsync and rename; an object in one upload). On a local disk every file and
folder of the staged shard is fsynced before its record is written, and each rename is made
durable (an fsync of its folder) before the next step. `status` turns `complete`, with
the `fidelity` block, once shards 0..n-1 are all committed and moved. A consumer that needs
the whole cache checks `status`.
""",
    "checksums": """
A shard's `checksum` is `sha256:` and the hex SHA-256 of its file (Arrow). For a Zarr group
it is the SHA-256 of one line per file, in the order of their paths relative to the group
(`/`-separated, compared as strings): the relative path, a NUL, `sha256:<hex>` of the file, a
NUL, its size in bytes, and a newline. `nbytes` is the file's size or the sum of the group's
files. A `tokenizer.files` entry's checksum is the SHA-256 of that file. In Python:
""",
    "fingerprint": """
Two caches with the same fingerprint hold the same content: it hashes what decides the
content (teacher, tokenizer, data, build settings, layout, encoding) and leaves out names and
paths where a hash identifies the thing. Every shard's metadata names it. From
`manifest.json`:
""",
    "compact_samples": """
A cache with `layout.compact_samples: true` (format 3.0, every build with `--samples` from
kdcache 0.3) stores per position only the draws that fell outside the top-k: their distinct
ids, how many of the `num_samples` draws gave each (the counts add up to the draws outside the
top-k; the others fell inside it and are implied), and their log-probabilities, ordered by
descending log-probability with ties by ascending id. The unused slots come last with count 0
and repeat the last listed id and value (a position with no draw outside the top-k repeats the
k-th top-k id and value), so they compress to almost nothing. The log-probabilities are stored
in the cache's value encoding, like the top-k's, in the columns below (in place of
`sample_logprobs`, which the float32 encoding keeps); a q format codes the distance below the
position's first listed value, which `sample_logprob_top1` holds exactly. A cache with
`layout.k: 0` stores no top-k columns at all: every draw is listed, `log_tail` is 0 and
`topk_ids`, `topk_logprobs` decode to width 0.
""",
    "v2_caches": """
A 2.x cache with samples (`num_samples` > 0, no `compact_samples`) lists every draw: distinct
ids in ascending order with counts adding up to `num_samples`, padding (count 0) repeating the
first id, and float32 log-probabilities in `sample_logprobs`. A 2.0 reader refuses 3.0 caches by
name; kdcache writes 3.0 only for caches with compact samples, so a cache without samples stays
2.0 and readable by kdcache 0.2.
""",
    "old_caches": """
kdcache reads caches of format 1.x; a 1.x reader refuses 2.0 caches by name. A 1.x cache has:

- shard metadata with only `format_version`, `cache_fingerprint` and `shard_index`: take the
  layout and encoding from `manifest.json`, and the value parameters from the table in
  [Top-k encodings](#top-k-encodings) (the programs below read them from the shard);
- no `document_hash` column (`layout.content_keys` absent or false);
- in the manifest: no `fidelity`, `derived`, per-shard `origin`, `origin_index` and
  `fidelity`, or `tokenizer.files` (the tokenizer copy is not checksummed); `created_by` without
  a version; local paths may be recorded as they were;
- shards staged inside `shards/` as `.tmp-NNNNNN-<tag>.<format>` (and written in place on
  object stores): a glob over `shards/` must skip names starting with `.tmp-`.
""",
    "reader": """
This program ({lines} lines) decodes every token of one shard with numpy and pyarrow, and zarr
for a Zarr shard, for every id and value encoding, taking the parameters from the shard's own
metadata. Its results are those of kdcache's own reader, bit for bit (the test runs it on
caches of both formats in every encoding).
""",
    "reader_after": """
`load` returns any stored column by name, so the other fields read the same way
(`column("log_tail")`, `column("input_ids")`). The `sorted` ids decode one row at a time in
Python: fine for a look, slow for a whole cache (kdcache's decoder is vectorised). For 1.x
shards, whose metadata has no encoding, take `encoding` and `layout` from `manifest.json`.
""",
    "interop": """
Readers that know nothing of kdcache see one row per sequence (Arrow) or one array per column
(Zarr), in stored form: the ids as stored and the top-k values in the cache's encoding (the
default, q8c, keeps the top-1 log-probability exact in `topk_logprob_top1`; the program above
decodes the rest). Each block starts from the committed shards of `manifest.json`:
""",
}
"""Prose of FORMAT.md by key; `schemas.spec` fills in the values."""
