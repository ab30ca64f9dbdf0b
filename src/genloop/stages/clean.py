"""clean: turn data/raw into normalised, deduplicated training images plus a manifest.

Every raw file is decoded fully (corrupt, truncated, empty, non-image, bombs and blank
images are dropped with a reason), converted to the corpus mode (transparency composited on
`data.background`), square-cropped and resized to `data.resolution`, and kept as pixels only
(no metadata) in shards: data/clean holds one `.npy` array per chunk of files, the manifest each
image's shard and offset (`genloop.core.shards`). Exact duplicates (same pixels) and near
duplicates (perceptual hash within `clean.near_duplicate_distance`) are dropped. Per-file results
are cached by (raw sha256, normalisation params, mode), so a second clean over an unchanged
data/raw decodes nothing again.

The corpus mode: `data.mode` L or RGB as set, or with `auto` RGB when any image clean keeps has
colour (`genloop.core.images.finish`, judged on the fitted image) and L when every one is
grey, decided over the whole corpus on every run. The decision reuses the per-file decode: the
colour of each file is cached with its result, files new to the cache are cleaned as grey until a
chunk with colour turns up,
and then every file is cleaned in RGB (a grey corpus is decoded once, a colour corpus once plus
the chunks before its first colour one).

The per-file work is `clean_chunk`, mapped over chunks of `parallel.chunk_size` files on the
engine `parallel.engine` names (`genloop.core.chunk_map`: one process per core by default, or a
Dask cluster); the cache index, the manifest and data/clean are written only when every chunk
has come back. When the mode changes (a colour image joins a
grey corpus) every image is cleaned again in the new mode: each mode has its own cache. The
manifest's `mode` column is the resolved mode every later stage reads (`corpus_mode`);
reports/clean.json says why it was chosen.
"""

from __future__ import annotations

import logging
import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from genloop.core.chunk_map import Engine, chunked, engine_summary
from genloop.core.config import Params
from genloop.core.errors import StageInputMissing
from genloop.core.manifest import (
    ARROW_STRING,
    FEEDBACK_SOURCE,
    MANIFEST_COLUMNS,
    ROLE_NEGATIVE,
    arrow_strings,
    conform,
    read_arrow,
    read_ledger,
)
from genloop.core.progress import Progress
from genloop.core.storage import atomic_outputs, restore_interrupted_swap
from genloop.core.workspace import Workspace
from genloop.stages.clean_chunk import CACHE_SCHEMA, SHARDS, ChunkJob, clean_chunk

log = logging.getLogger(__name__)

_PANDAS_TYPES = {pa.string(): pd.StringDtype("pyarrow"), pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}
# the cache index as a table: the chunks' Arrow columns (CACHE_SCHEMA) with their pandas dtypes
CACHE_COLUMNS = {f.name: _PANDAS_TYPES[f.type] for f in CACHE_SCHEMA}


def _isin(values: pd.Series, among: pd.Series) -> pd.Series:
    """`values.isin(among)` for Arrow string columns through pyarrow's own kernel: pandas' isin on
    them took 14.4 s at 1M rows, `pyarrow.compute.is_in` 1.1 s."""
    found = pc.is_in(pa.array(values, pa.string()), value_set=pa.array(among, pa.string()))
    return pd.Series(found.to_numpy(zero_copy_only=False), index=values.index, dtype=bool)


CACHE_VERSION = 3  # 2: images in shards, perceptual hashes from genloop.core.images.perceptual_hash;
# 3: colour judged on the fitted image, grey from colour sources converted after the fit


def _cache_dir(cfg: Params, ws: Workspace, mode: str) -> Path:
    """The per-file cache of one resolved mode (auto and the mode it resolved to share one)."""
    resolved = cfg.model_copy(update={"data": cfg.data.model_copy(update={"mode": mode})})
    key = resolved.section_hash("data", "clean")
    return ws.cache / "clean" / f"{key}-v{CACHE_VERSION}"


# the cache index's columns clean's manifest and report use
RESULT_COLUMNS = ["raw_sha256", "reason", "pixel_hash", "phash", "note", "clean_sha256", "shard", "offset"]


def _load_cache(cache: Path) -> pd.DataFrame:
    index = cache / "index.parquet"
    if index.exists():
        table = read_arrow(index)
        if set(CACHE_COLUMNS) <= set(table.columns):  # an index from before a column was added: redo
            return table[list(CACHE_COLUMNS)].astype(CACHE_COLUMNS)
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in CACHE_COLUMNS.items()})


def _process(cfg: Params, ws: Workspace, engine: Engine, ledger: pd.DataFrame, mode: str,
             until_colour: bool = False) -> tuple[pd.DataFrame, int]:
    """Normalise in `mode` every ledger file not yet in that mode's cache (with `until_colour`:
    stop once a chunk keeps an image with colour; the chunks already running finish); return the
    cache index and #new. The cache index is written once, after every chunk has come back."""
    cache = _cache_dir(cfg, ws, mode)
    index = _load_cache(cache)
    todo = ledger.loc[~_isin(ledger["sha256"], index["raw_sha256"]), ["sha256", "file"]]
    # absolute paths: a Dask worker runs in a folder of its own
    job = ChunkJob(ws.raw.resolve(), cache.resolve(), mode, cfg.data.resolution, cfg.clean.max_pixels,
                   cfg.clean.min_side, cfg.clean.blank_std, cfg.data.background)
    files = list(zip(todo["sha256"], todo["file"], strict=True))
    del todo
    chunks = chunked(files, cfg.parallel.chunk_size)
    if chunks:
        cache.mkdir(parents=True, exist_ok=True)
        log.info("clean: %d files to decode in %d chunks (%s)", len(files), len(chunks),
                 engine_summary(cfg.parallel))
    with Progress(f"clean ({mode})", len(files), "files") as bar:
        dropped = 0

        def advance(batch: pa.RecordBatch) -> None:
            nonlocal dropped
            dropped += batch.num_rows - batch.column("reason").null_count  # a reason: dropped
            bar.advance(batch.num_rows, dropped=dropped)

        stop = (lambda batch: bool(pc.any(batch.column("colour")).as_py())) if until_colour else None
        batches = engine.map(partial(clean_chunk, job), chunks, advance, stop)
    new_rows = sum(b.num_rows for b in batches)
    if new_rows:
        # straight from Arrow to the index's dtypes: no Python object per value on the way
        new = pa.Table.from_batches(batches, CACHE_SCHEMA).to_pandas(types_mapper=_PANDAS_TYPES.get)
        del batches
        # an empty index is left out: pandas warns about concatenating empty or all-NA frames
        index = pd.concat([index, new], ignore_index=True) if len(index) else new
        write_table_any(index, cache / "index.parquet")
    return index, new_rows


def _kept_colour(index: pd.DataFrame, ledger: pd.DataFrame) -> tuple[int, int]:
    """(ledger files in `index` kept by the per-file checks that have colour, all of them kept)."""
    rows = index[_isin(index["raw_sha256"], ledger["sha256"]) & index["reason"].isna()]
    return int(rows["colour"].fillna(False).sum()), len(rows)


def _clean_files(cfg: Params, ws: Workspace, engine: Engine, ledger: pd.DataFrame) -> tuple[str, pd.DataFrame, int]:
    """The corpus mode, its per-file cache index, and how many files were decoded for them."""
    if cfg.data.mode != "auto":
        return cfg.data.mode, *_process(cfg, ws, engine, ledger, cfg.data.mode)
    decoded = 0
    # a file either mode's cache already knows to have colour settles it without decoding anything
    known = any(_kept_colour(_load_cache(_cache_dir(cfg, ws, m)), ledger)[0] for m in ("L", "RGB"))
    if not known:
        index, decoded = _process(cfg, ws, engine, ledger, "L", until_colour=True)
        if not _kept_colour(index, ledger)[0]:
            return "L", index, decoded
    index, processed = _process(cfg, ws, engine, ledger, "RGB")
    return "RGB", index, decoded + processed


def _mode_report(cfg: Params, mode: str, index: pd.DataFrame, ledger: pd.DataFrame) -> dict[str, Any]:
    """The mode clean used and why: the report's first lines."""
    colour, images = _kept_colour(index, ledger)
    counted = f"{colour:,} of {images:,} images have colour"
    if cfg.data.mode != "auto":
        reason = f"set by data.mode ({counted})"
    else:
        reason = counted if mode == "RGB" else f"every image is grey ({images:,} images)"
    return {"mode": mode, "mode_reason": reason, "colour_images": colour, "background": cfg.data.background}


def write_table_any(df: pd.DataFrame, path: Path) -> None:
    from genloop.core.storage import atomic_path

    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def near_duplicate_pairs(phashes: list[str], max_distance: int, chunk: int = 256) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose perceptual hashes differ in at most `max_distance` bits.

    Distance 0 (the default) groups equal hashes in one pass and pairs each image with the first
    of its group, which is all `_dedupe` needs, in O(n) time and memory. Larger distances compare
    every hash with every other, `chunk` rows at a time: O(n^2) time, `chunk * n` words of memory
    (256 rows of 100k hashes: 200 MB; the 2,048 rows this used before took 1.6 GB)."""
    if not phashes:
        return []
    if max_distance == 0:
        first: dict[str, int] = {}
        pairs = []
        for j, h in enumerate(phashes):
            i = first.setdefault(h, j)
            if i != j:
                pairs.append((i, j))
        return pairs
    hashes = np.array([int(h, 16) for h in phashes], dtype=np.uint64)
    pairs = []
    for start in range(0, len(hashes), chunk):
        block = hashes[start : start + chunk]
        dist = np.bitwise_count(block[:, None] ^ hashes[None, :])
        ii, jj = np.nonzero(dist <= max_distance)
        ii = ii + start
        keep = jj > ii
        pairs.extend(zip(ii[keep].tolist(), jj[keep].tolist(), strict=True))
    return pairs


def _dedupe(kept: pd.DataFrame, max_distance: int) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """Drop exact then near duplicates, keeping the first of each group (stable order)."""
    dropped: list[dict[str, str]] = []
    first = kept.drop_duplicates("pixel_hash", keep="first")
    for sha, ph in kept.loc[~kept.index.isin(first.index), ["raw_sha256", "pixel_hash"]].itertuples(
        index=False
    ):
        twin = first.loc[first["pixel_hash"] == ph, "raw_sha256"].iloc[0]
        dropped.append({"raw_sha256": sha, "reason": f"exact duplicate of {twin[:16]}"})
    kept = first.reset_index(drop=True)
    if max_distance >= 0 and len(kept):
        removed: set[int] = set()
        for i, j in sorted(near_duplicate_pairs(kept["phash"].tolist(), max_distance)):
            if i in removed or j in removed:
                continue
            removed.add(j)
            dropped.append(
                {
                    "raw_sha256": kept.at[j, "raw_sha256"],
                    "reason": f"near duplicate of {kept.at[i, 'raw_sha256'][:16]} "
                    f"(perceptual hash distance <= {max_distance})",
                }
            )
        kept = kept.drop(index=sorted(removed)).reset_index(drop=True)
    return kept, dropped


def _split(raw_sha: str, holdout_fraction: float) -> str:
    """A stable split: the same image is in the same split in every data version."""
    return "holdout" if int(raw_sha[:8], 16) / 0xFFFFFFFF < holdout_fraction else "train"


def _publish(cache: Path, rows: pd.DataFrame, folder: Path) -> None:
    """Fill the (temporary) folder that becomes data/clean with the shards of the kept images (a
    shard may also hold images dropped later as duplicates: the manifest does not name them)."""
    for name in rows["shard"].drop_duplicates():
        src, dst = cache / SHARDS / name, folder / name
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)


def _report(ledger: pd.DataFrame, kept: pd.DataFrame, rejected: pd.DataFrame, dup_drops: list[dict[str, str]],
            negatives: int, processed: int) -> dict[str, Any]:
    """reports/clean.json: counts, every dropped file with its reason, and the notes on kept files."""
    noted = kept[kept["note"].notna()]
    named = set(rejected["sha256"].tolist()) | {d["raw_sha256"] for d in dup_drops} | set(noted["raw_sha256"].tolist())
    mine = ledger[_isin(ledger["sha256"], pd.Series(sorted(named), dtype=ARROW_STRING))]
    # plain dicts of the few files named: a lookup per file in the Arrow-string frame took 8.6 s at 1M
    file_of = dict(zip(mine["sha256"].tolist(), mine["file"].tolist(), strict=True))
    original_of = dict(zip(mine["sha256"].tolist(), mine["original"].tolist(), strict=True))
    source_of = dict(zip(mine["sha256"].tolist(), mine["source"].tolist(), strict=True))
    dropped = [
        {"raw_sha256": s, "reason": r} for s, r in zip(rejected["sha256"], rejected["reason"], strict=True)
    ] + dup_drops
    for d in dropped:
        d["file"] = f"data/raw/{file_of[d['raw_sha256']]}"
        d["original"] = str(original_of[d["raw_sha256"]])
        d["source"] = str(source_of[d["raw_sha256"]])
    reasons: dict[str, int] = {}
    for d in dropped:
        kind = d["reason"].split(":")[0].split(" (")[0].split(" of ")[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {
        "raw": len(ledger),
        "negatives_skipped": negatives,
        "kept": len(kept),
        "dropped": len(dropped),
        "dropped_by_reason": reasons,
        "decoded": processed,
        "reused": len(ledger) - processed,
        "splits": kept["split"].value_counts().to_dict(),
        "dropped_files": sorted(dropped, key=lambda d: d["file"]),
        # kept images read with a choice made (an animation: only its first frame is used)
        "notes": sorted(({"raw_sha256": s, "id": i, "file": f"data/raw/{file_of[s]}",
                          "original": str(original_of[s]), "note": n}
                         for s, i, n in zip(noted["raw_sha256"].tolist(), noted["id"].tolist(),
                                            noted["note"].tolist(), strict=True)), key=lambda d: d["file"]),
    }


def run(cfg: Params, ws: Workspace) -> dict[str, object]:
    """Clean data/raw into data/clean + data/manifest.parquet + reports/clean.json."""
    if not ws.ledger.exists():
        moved = f" (it is still in {ws.raw}, where older genloop kept it: collect moves it)" \
            if ws.legacy_ledger.exists() else ""
        raise StageInputMissing(f"{ws.ledger} not found: run `genloop collect` first{moved}")
    restore_interrupted_swap(ws.clean)  # a run killed mid-swap where renames cannot exchange: put it back now
    # one engine (a local Dask cluster, with engine dask) for both of data.mode auto's passes
    with Engine(cfg.parallel, clean_chunk) as engine:
        ledger = read_ledger(ws.ledger, arrow=True)
        negatives = int((ledger["role"] == ROLE_NEGATIVE).sum())  # rejected generated images: never trained on
        ledger = ledger[ledger["role"] != ROLE_NEGATIVE].sort_values("sha256").reset_index(drop=True)
        mode, index, processed = _clean_files(cfg, ws, engine, ledger)
    cache = _cache_dir(cfg, ws, mode)
    mode_report = _mode_report(cfg, mode, index, ledger)
    # one row per file with what the manifest and the report need, and nothing else: at 1M files
    # every table here is a few hundred MB, so each is dropped as soon as the next is made
    results = ledger[["sha256", "source", "label"]].merge(index[RESULT_COLUMNS], left_on="sha256",
                                                          right_on="raw_sha256", how="left")
    del index
    rejected = results.loc[results["reason"].notna(), ["sha256", "reason"]]
    kept = results[results["reason"].isna()].reset_index(drop=True)
    del results
    kept, dup_drops = _dedupe(kept, cfg.clean.near_duplicate_distance)

    kept = kept.assign(
        id=kept["raw_sha256"].str.slice(0, 16),
        mode=mode,
        # generated images (source feedback:) always train: the holdout is evaluation's *real* reference
        split=[("train" if src == FEEDBACK_SOURCE else _split(s, cfg.data.holdout_fraction))
               for s, src in zip(kept["raw_sha256"].tolist(), kept["source"].tolist(), strict=True)],
    )
    kept["sha256"] = kept["clean_sha256"]
    kept["width"] = cfg.data.resolution
    kept["height"] = cfg.data.resolution

    report = mode_report | _report(ledger, kept, rejected, dup_drops, negatives, processed)
    dropped = report["dropped_files"]
    with atomic_outputs() as out:  # data/clean, the manifest and the report: all three or none
        _publish(cache, kept, out.folder(ws.clean))
        conform(kept, arrow_strings(MANIFEST_COLUMNS)).to_parquet(out.file(ws.manifest), index=False)
        out.write_json(ws.report("clean"), report)
    log.info("clean: mode %s, %s; transparency composited on %s", mode, report["mode_reason"], cfg.data.background)
    log.info("clean: kept %d of %d (%d dropped, %d decoded, %d reused)",
             len(kept), len(ledger), len(dropped), processed, len(ledger) - processed)
    return {k: v for k, v in report.items() if k not in ("dropped_files", "notes")} | {"notes": len(report["notes"])}
