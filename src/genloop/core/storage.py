"""Local files and s3:// objects: atomic writes, content hashes, S3 clients from the env."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import mimetypes
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from genloop.core.errors import GenloopError

log = logging.getLogger(__name__)

S3_ENDPOINT_VARS = ("GENLOOP_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Temporary files and folders are named .<name>.<pid>@<host>-<random>.tmp beside their target:
# one left by a process that died (SIGKILL, power loss) is recognised and removed later.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]
_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[0-9a-f]{6})-[^/]*\.tmp$")
_swept: set[Path] = set()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_temps(folder: Path) -> list[Path]:
    """Remove the temporary files and folders in `folder` that processes of this host, now dead,
    left behind (a run killed mid-write); return them. Each folder is swept once per process."""
    folder = Path(folder)
    key = folder.resolve()
    if key in _swept:
        return []
    _swept.add(key)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    for entry in entries:
        m = _STALE.match(entry.name)
        if m and m["host"] == _HOST and not _alive(int(m["pid"])):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temporary files left in %s by runs that died: %s", len(removed), folder,
                 ", ".join(p.name for p in removed[:5]))
    return removed


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp make private (0600/0700) entries: published outputs get the usual modes
_FILE_MODE = 0o666 & ~_process_umask()
_DIR_MODE = 0o777 & ~_process_umask()


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}@{_HOST}-"


def temp_file(path: Path) -> Path:
    """A new empty temporary file beside `path` (same folder: renaming it over `path` is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    return Path(tmp)


def temp_dir(path: Path) -> Path:
    """A new empty temporary folder beside the folder `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(path.parent)
    restore_interrupted_swap(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(_DIR_MODE)
    return tmp


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc: Any = None


def _exchange(a: Path, b: Path) -> None:
    """Swap the two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE): there is no
    moment at which either name is missing. Raises OSError where the kernel, the C library or the
    filesystem cannot do it (EINVAL, ENOSYS, EOPNOTSUPP...)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not in this C library")
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


def _backup(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def restore_interrupted_swap(path: Path) -> bool:
    """Where a run died between the two renames of a swap without RENAME_EXCHANGE (the old folder
    moved aside, the new one not yet in place), put the old folder back; True when it did."""
    path = Path(path)
    old = _backup(path)
    if old.is_dir() and not os.path.lexists(path):
        os.replace(old, path)
        log.warning("%s was missing after an interrupted swap: restored the previous output from %s", path, old.name)
        return True
    return False


def _swap_dir(tmp: Path, path: Path) -> None:
    """Put the folder `tmp` in the place of `path`, the old one then deleted.

    Where `path` exists, the two are exchanged in one atomic step, so that a reader (or a run
    killed at any instant) always finds `path`: the previous folder or the new one, complete.
    Only where the filesystem cannot exchange is it two renames (old aside, new in); a run killed
    between them leaves `.<name>.old`, which `restore_interrupted_swap` (called when a stage
    starts and before any write of `path`) puts back.
    """
    restore_interrupted_swap(path)
    if os.path.lexists(path):
        try:
            _exchange(tmp, path)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
                raise
            log.debug("cannot exchange %s and %s atomically (%s): two renames", tmp, path, exc)
        else:
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous folder
            return
    old = _backup(path)
    if old.exists():
        shutil.rmtree(old)
    if os.path.lexists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _discard(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    tmp_path = temp_file(path)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` durably to `path` through a temporary file renamed over it."""
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
    tmp = temp_dir(path)
    try:
        yield tmp
        _swap_dir(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class Outputs:
    """The outputs of one stage, staged beside their final paths by `atomic_outputs`."""

    def __init__(self) -> None:
        self.staged: list[tuple[Path, Path]] = []  # (temporary, final), in publishing order

    def file(self, path: Path) -> Path:
        """A temporary path to write the file `path` to."""
        tmp = temp_file(path)
        self.staged.append((tmp, Path(path)))
        return tmp

    def folder(self, path: Path) -> Path:
        """A temporary folder to build the folder `path` in."""
        tmp = temp_dir(path)
        self.staged.append((tmp, Path(path)))
        return tmp

    def write_bytes(self, path: Path, data: bytes) -> None:
        with open(self.file(path), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, path: Path, obj: Any) -> None:
        self.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


@contextmanager
def atomic_outputs() -> Iterator[Outputs]:
    """Stage several files and folders, and publish them together when the block succeeds.

    Everything is written first (a full disk or any error leaves every previous output as it
    was, and no temporary file behind); publishing is renames only, in the order staged.
    """
    out = Outputs()
    try:
        yield out
        for tmp, final in out.staged:
            if tmp.is_dir():
                _swap_dir(tmp, final)
            else:
                os.replace(tmp, final)
    finally:
        for tmp, _ in out.staged:
            if tmp.exists():
                _discard(tmp)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split s3://bucket/prefix into (bucket, prefix)."""
    if not uri.startswith("s3://"):
        raise GenloopError(f"{uri!r} is not an s3:// URI")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise GenloopError(f"{uri!r} names no bucket; use s3://bucket/prefix")
    return bucket, prefix


def s3_endpoint_setting() -> tuple[str | None, str]:
    """(endpoint URL, the variable it came from); (None, GENLOOP_S3_ENDPOINT_URL) when none is set."""
    for var in S3_ENDPOINT_VARS:
        if os.environ.get(var):
            return os.environ[var], var
    return None, S3_ENDPOINT_VARS[0]


def s3_endpoint_url() -> str | None:
    """The S3 endpoint from GENLOOP_S3_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (first set)."""
    return s3_endpoint_setting()[0]


def s3_client() -> Any:
    """A boto3 S3 client; endpoint from GENLOOP_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL[_S3]),
    credentials from the standard AWS environment variables or profiles, bounded retries."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=5, read_timeout=30
    )
    return boto3.client("s3", endpoint_url=s3_endpoint_url(), config=cfg)


def transient_s3(exc: BaseException) -> bool:
    """Connection failures, timeouts, 5xx and throttling are worth a retry; a missing bucket
    or a denied request is not."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ConnectionError | HTTPClientError):
        return True
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return status >= 500 or err.get("Code") in {"Throttling", "ThrottlingException", "SlowDown"}
    return False


def describe_s3_failure(uri: str, exc: BaseException | str, action: str = "read") -> str:
    """A message naming what failed (`cannot <action> <uri>`), the endpoint used and the
    variable that sets it, so the user knows what to fix."""
    endpoint, var = s3_endpoint_setting()
    where = endpoint or "the AWS default endpoint"
    fix = var if endpoint else f"{var} (unset: the AWS default endpoint is used)"
    cause = exc if isinstance(exc, str) else f"{exc.__class__.__name__}: {exc}"
    return (
        f"cannot {action} {uri} at {where}: {cause}. "
        f"Check {fix} and the AWS credentials in the environment."
    )


def s3_key_problem(path: str) -> str | None:
    """Why `path` (slash-separated segments appended to an S3 prefix) could name a key outside
    that prefix, or one a client might resolve elsewhere; None when every segment is plain."""
    if not path:
        return "it is empty"
    if path.startswith("/"):
        return "it starts with '/'"
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            return f"segment {segment!r} is {'empty' if not segment else 'a relative path step'}"
        if "\\" in segment:
            return f"segment {segment!r} holds a backslash"
        if any(ord(c) < 32 or ord(c) == 127 for c in segment):
            return f"segment {segment!r} holds a control character"
    return None


def join_s3_uri(base: str, *parts: str) -> str:
    """`base` (s3://bucket[/prefix][/]) with `parts` appended as path segments.

    A part (a model version, a file name) that could step out of `base`'s prefix (`..`, a
    leading `/`, a backslash, an empty segment) raises GenloopError naming it.
    """
    _, prefix = parse_s3_uri(base)
    if prefix.strip("/") and (problem := s3_key_problem(prefix.strip("/"))):
        raise GenloopError(f"S3 prefix {base!r} is not usable: {problem}")
    for part in parts:
        part = str(part)
        if problem := s3_key_problem(part.rstrip("/") if part.strip("/") else part):
            raise GenloopError(f"{part!r} cannot be appended to {base!r}: {problem} (it could name a key outside "
                               "the prefix)")
    return "/".join([base.rstrip("/"), *(str(p).rstrip("/") for p in parts)])


def _list_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _delete_keys(client: Any, bucket: str, keys: list[str]) -> None:
    for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1,000 keys
        batch = [{"Key": k} for k in keys[i : i + 1000]]
        answer = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        if answer.get("Errors"):
            first = answer["Errors"][0]
            raise RuntimeError(f"{len(answer['Errors'])} objects not deleted, e.g. {first.get('Key')}: "
                               f"{first.get('Code')} {first.get('Message')}")


def _put_file(client: Any, bucket: str, key: str, path: Path) -> None:
    extra = {"ContentType": mime} if (mime := mimetypes.guess_type(path.name)[0]) else {}
    with open(path, "rb") as body:
        client.put_object(Bucket=bucket, Key=key, Body=body, **extra)


def _upload_plan(local: Path, s3_uri: str) -> tuple[str, str, list[str]]:
    """Bucket, prefix and the folder's files (relative), each checked to stay under the prefix."""
    from genloop.core.errors import SinkError

    if not local.is_dir():
        raise SinkError(f"cannot upload {local} to {s3_uri}: {local} is not a folder")
    bucket, prefix = parse_s3_uri(s3_uri)
    prefix = prefix.strip("/")
    if not prefix:
        raise SinkError(f"upload_dir mirrors a folder under a prefix; {s3_uri!r} names the whole bucket")
    if problem := s3_key_problem(prefix):
        raise SinkError(f"cannot upload {local} to {s3_uri}: the prefix is not usable: {problem}")
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    for rel in files:  # a file name becomes part of a key: it must not step out of the prefix
        if problem := s3_key_problem(rel):
            raise SinkError(f"cannot upload {local} to {s3_uri}: file {rel!r} would not stay under the prefix "
                            f"({problem}); nothing was uploaded")
    return bucket, prefix, files


def upload_dir(
    local: Path,
    s3_uri: str,
    last: tuple[str, ...] = ("manifest.parquet", "scores.parquet"),
    workers: int = 8,
) -> list[str]:
    """Mirror the folder `local` to the prefix `s3_uri`; return the URIs uploaded, in order.

    The files named in `last` (relative paths) are uploaded after every other file, so their
    presence marks a complete batch: an old copy of them is deleted before the upload starts,
    and objects under the prefix that the folder no longer holds are deleted at the end.
    Any failure raises SinkUnreachable (connection, 5xx, throttling: retry later) or SinkError,
    naming the URI, the endpoint and the variable to fix.
    """
    from genloop.core.errors import SinkError, SinkUnreachable

    local = Path(local)
    bucket, prefix, files = _upload_plan(local, s3_uri)
    tail = [rel for rel in last if rel in files]
    body = [rel for rel in files if rel not in tail]
    key = {rel: f"{prefix}/{rel}" for rel in files}
    uploaded: list[str] = []
    client = s3_client()
    try:
        existing = _list_keys(client, bucket, prefix + "/")
        stale_markers = [key[rel] for rel in tail if key[rel] in existing]
        if stale_markers:  # the old batch is no longer complete once its files start changing
            _delete_keys(client, bucket, stale_markers)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(_put_file, client, bucket, key[rel], local / rel): rel for rel in body}
            try:
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        uploaded.extend(f"s3://{bucket}/{key[rel]}" for rel in body)
        for rel in tail:
            _put_file(client, bucket, key[rel], local / rel)
            uploaded.append(f"s3://{bucket}/{key[rel]}")
        wanted = set(key.values())
        stale = [k for k in existing if k not in wanted]
        if stale:
            _delete_keys(client, bucket, stale)
    except Exception as exc:  # botocore raises many unrelated types; all mean "cannot write"
        error = SinkUnreachable if transient_s3(exc) else SinkError
        raise error(describe_s3_failure(s3_uri, exc, "write")) from exc
    log.info("uploaded %d files from %s to %s (%d stale objects removed)", len(uploaded), local, s3_uri,
             len(stale))
    return uploaded
