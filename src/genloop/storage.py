"""Local files and s3:// objects: atomic writes, content hashes, S3 clients from the env."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from genloop.errors import GenloopError

S3_ENDPOINT_VARS = ("GENLOOP_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Build a folder in a sibling temp folder and swap it into place when the block succeeds.

    The previous folder stays intact until the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = path.with_name(f".{path.name}.old")
    try:
        yield tmp
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split s3://bucket/prefix into (bucket, prefix)."""
    if not uri.startswith("s3://"):
        raise GenloopError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise GenloopError(f"{uri!r} names no bucket; use s3://bucket/prefix")
    return bucket, prefix


def s3_endpoint_url() -> str | None:
    for var in S3_ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var]
    return None


def s3_client() -> Any:
    """A boto3 S3 client; endpoint from GENLOOP_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL[_S3]),
    credentials from the standard AWS environment variables or profiles, bounded retries."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=30
    )
    return boto3.client("s3", endpoint_url=s3_endpoint_url(), config=cfg)


def describe_s3_failure(uri: str, exc: Exception) -> str:
    endpoint = s3_endpoint_url() or "the AWS default endpoint"
    return (
        f"cannot read {uri} at {endpoint}: {exc.__class__.__name__}: {exc}. "
        f"Check GENLOOP_S3_ENDPOINT_URL and the AWS credentials in the environment."
    )
