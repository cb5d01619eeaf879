"""`kdcache export`: a cache as Parquet, or as a dataset axolotl's KD plugin trains on
(`schemas.export`)."""

from __future__ import annotations

import click

from kdcache._options import cache_url, friendly_errors, parse_storage_options, storage_option

TARGETS = ("axolotl", "parquet")
"""`schemas.export.EXPORT_TARGETS`, written here too so `kdcache --help` imports no schemas
(tests/integration/test_export.py checks that the two agree)."""


@click.command()
@click.argument("cache", callback=cache_url("CACHE"))
@click.argument("out", callback=cache_url("OUT"))
@click.option(
    "--to",
    "to",
    type=click.Choice(TARGETS),
    required=True,
    help="parquet: every field, lossless. axolotl: the columns of axolotl's KD plugin.",
)
@click.option(
    "--temperature",
    type=float,
    default=1.0,
    show_default=True,
    help="axolotl only: the teacher's top-k as softmax(log-probs / T) over the top-k; set it to "
    "axolotl's kd_temperature (a saved dataset skips axolotl's own rescaling).",
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an earlier `kdcache export` at OUT (nothing else)."
)
@storage_option
@friendly_errors
def export(
    cache: str,
    out: str,
    to: str,
    temperature: float,
    overwrite: bool,
    storage_option: tuple[str, ...],
) -> None:
    """Export the complete CACHE to the folder OUT, one row per sequence, for tools that do not
    know kdcache. Every shard is checked (checksum, identity, records) before it is written.

    \b
    --to parquet: OUT/part-00000.parquet, ... (one file per shard, cache order) and
    OUT/_kdcache.json (the cache's fingerprint, k, vocabulary size, the alignment, each
    column's meaning). Columns: sequence (global index), source_row, source_start,
    document_hash; per token as lists: input_ids, topk_ids, topk_logprobs (decoded log-probs),
    lse, log_tail, label_logprob, and temp_lse and sample_ids/counts/logprobs when the cache has
    them. Nothing is lost. Alignment: at position t, topk_* (and lse, log_tail, label_logprob)
    describe the NEXT token, input_ids[t + 1]; label_logprob is NaN at a row's last position.
    Read with DuckDB, pandas, Polars or datasets.load_dataset("parquet", data_files=...).
    OUT may be an fsspec URL (s3://...).

    \b
    --to axolotl: a datasets.Dataset.save_to_disk folder (pip install 'kdcache[datasets]')
    with input_ids, labels (= input_ids), attention_mask, and per token [T, k]:
    target_token_ids, target_logprobs, target_mask, for axolotl's KD plugin
    (plugins: axolotl.integrations.kd.KDPlugin, kd_trainer: true, datasets: path: OUT).
    Alignment: target_*[t] describe token t + 1, as the cache does, no shift (axolotl's
    src/axolotl/integrations/kd/trainer.py pairs the hidden state at t with target_*[t] in
    kernels/liger.py, which shifts only the CE labels; collator_online_teacher.py aligns
    vLLM's logprobs the same way). target_mask[t] is 0 at a row's last position, else 1.
    target_logprobs are renormalised over the top-k, as axolotl's chat_template.py does and
    topk_logprob/forward_kl.py expects. Lost: the tail mass, lse, log_tail, label_logprob,
    temp_lse, samples, content keys and source rows; sequences of < 2 tokens; -inf top-k
    log-probs become -1e9. axolotl before June 2025 (PR #2700) expected target_* shifted by one.

    \b
    Examples:
      kdcache export s3://team/caches/web-k64 --to parquet ./web-k64-parquet
      kdcache export ./web-k64 --to axolotl ./web-k64-axolotl --temperature 2
    """
    from schemas.export import export_cache

    result = export_cache(
        cache,
        to,
        out,
        overwrite=overwrite,
        temperature=temperature,
        **parse_storage_options(storage_option),
    )
    click.echo(result.summary())
