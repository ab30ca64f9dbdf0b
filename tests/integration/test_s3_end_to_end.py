"""S3 end to end against real moto servers: sink uploads, all-or-nothing collect, DVC S3 remote."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from genloop.core import storage
from genloop.core.config import load_params
from genloop.core.errors import (
    GenloopError,
    RemoteError,
    RemoteUnreachable,
    SinkError,
    SinkUnreachable,
    SourceError,
    SourceUnreachable,
    Unreachable,
)
from genloop.core.workspace import Workspace
from genloop.mlops import dvc_remote
from genloop.stages import collect, generate
from tests.conftest import free_port
from tests.helpers import TINY

SECRET = "genloop-test-secret-must-not-leak"


# ---------------------------------------------------------------- helpers


def client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


def make_bucket(endpoint: str, name: str) -> str:
    s3 = client(endpoint)
    try:
        s3.create_bucket(Bucket=name)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    return name


def objects(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix`, downloaded: {key relative to prefix: bytes}."""
    s3 = client(endpoint)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k[len(prefix) :]: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def folder(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def png(seed: int, size: int = 8) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    arr[0, :4] = np.frombuffer(seed.to_bytes(4, "big"), dtype=np.uint8)  # no two seeds collide
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def write_pngs(root: Path, seeds: range) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (root / f"{seed:04d}.png").write_bytes(png(seed))


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


def git(root: Path, *args: str) -> None:
    ident = ["-c", "user.email=test@example.com", "-c", "user.name=genloop test"]
    subprocess.run(["git", *ident, *args], cwd=root, check=True, capture_output=True)


def git_dvc_repo(root: Path) -> Workspace:
    root.mkdir(parents=True)
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    return Workspace.at(root)


def snapshot(ws: Workspace) -> dict[str, object]:
    """Everything collect may touch: data/raw (files and bytes), the ledger, data.dvc and the ledger's .dvc."""
    return {
        "raw": folder(ws.raw) if ws.raw.exists() else {},
        **{p.name: p.read_bytes() if p.exists() else None for p in (ws.ledger, ws.data_dvc, ws.ledger_dvc)},
    }


def staged_files(ws: Workspace) -> list[Path]:
    staging = ws.cache / "collect-staging"
    return [p for p in staging.rglob("*")] if staging.exists() else []


def record_calls(monkeypatch: pytest.MonkeyPatch, module: Any, events: list[tuple[str, object]]) -> None:
    """Make `module.s3_client` return real clients that note each S3 call (operation, key(s))."""
    real = storage.s3_client
    lock = threading.Lock()

    def note(model: Any, params: dict[str, Any], **_: Any) -> None:
        keys = params.get("Key") or [o["Key"] for o in params.get("Delete", {}).get("Objects", [])]
        with lock:
            events.append((model.name, keys))

    def recording_client() -> Any:
        c = real()
        c.meta.events.register("provide-client-params.s3.*", note)
        return c

    monkeypatch.setattr(module, "s3_client", recording_client)


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private moto server (one this test may kill); returns the process and its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 30
    while True:
        try:
            with opener.open(url + "/", timeout=2):
                return proc, url
        except urllib.error.HTTPError:
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto did not start:\n{log.read_text()}") from None
            time.sleep(0.1)


# ---------------------------------------------------------------- storage.upload_dir


def test_upload_dir_mirrors_the_folder_with_the_manifest_last(
    tmp_path: Path, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = make_bucket(s3_env, "sink-unit")
    batch = tmp_path / "7"
    for i in range(12):
        (batch / f"{i:06d}.png").parent.mkdir(parents=True, exist_ok=True)
        (batch / f"{i:06d}.png").write_bytes(png(i))
    (batch / "sub").mkdir()
    (batch / "sub" / "note.json").write_text('{"a": 1}')
    pd.DataFrame({"file": [f"{i:06d}.png" for i in range(12)]}).to_parquet(batch / "manifest.parquet")
    (batch / "grid.png").write_bytes(png(99))
    # an older batch at the same prefix: a file the new one lacks, and its manifest
    s3 = client(s3_env)
    s3.put_object(Bucket=bucket, Key="gen/7/stale.png", Body=b"old")
    s3.put_object(Bucket=bucket, Key="gen/7/manifest.parquet", Body=b"old manifest")
    s3.put_object(Bucket=bucket, Key="gen/70/other-batch.png", Body=b"keep")  # not under gen/7/

    events: list[tuple[str, object]] = []
    record_calls(monkeypatch, storage, events)
    uploaded = storage.upload_dir(batch, f"s3://{bucket}/gen/7")

    local = folder(batch)
    assert sorted(uploaded) == sorted(f"s3://{bucket}/gen/7/{rel}" for rel in local)
    assert objects(s3_env, bucket, "gen/7/") == local  # every file, same bytes, nothing stale
    assert objects(s3_env, bucket, "gen/70/") == {"other-batch.png": b"keep"}
    puts = [key for op, key in events if op == "PutObject"]
    assert len(puts) == len(local) and puts[-1] == "gen/7/manifest.parquet"
    # the old manifest went first (the old batch stops looking complete), the stale file last
    deletes = [(i, keys) for i, (op, keys) in enumerate(events) if op == "DeleteObjects"]
    first_put = next(i for i, (op, _) in enumerate(events) if op == "PutObject")
    assert deletes[0][1] == ["gen/7/manifest.parquet"] and deletes[0][0] < first_put
    assert deletes[-1][1] == ["gen/7/stale.png"] and deletes[-1][0] > len(events) - 2


def test_upload_dir_to_a_missing_bucket_is_a_sink_error(tmp_path: Path, s3_env: str) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.parquet").write_bytes(b"x")
    with pytest.raises(SinkError) as info:
        storage.upload_dir(tmp_path / "b", "s3://no-such-sink-bucket/gen/1")
    msg = str(info.value)
    assert "cannot write s3://no-such-sink-bucket/gen/1" in msg and s3_env in msg
    assert not isinstance(info.value, Unreachable)  # not worth retrying


def test_upload_dir_to_an_unreachable_endpoint_is_bounded_and_retryable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("GENLOOP_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    write_pngs(tmp_path / "b", range(3))
    start = time.monotonic()
    with pytest.raises(SinkUnreachable) as info:
        storage.upload_dir(tmp_path / "b", "s3://bucket/gen/1")
    elapsed = time.monotonic() - start
    assert isinstance(info.value, Unreachable)  # the flows' retry condition
    msg = str(info.value)
    assert endpoint in msg and "GENLOOP_S3_ENDPOINT_URL" in msg and "s3://bucket/gen/1" in msg
    assert elapsed < 60, f"took {elapsed:.0f} s to give up"


# ---------------------------------------------------------------- generate / optimize sinks


@pytest.fixture(scope="module")
def sunk_pipeline(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """The tiny real loop (embedded sqlite MLflow) with generate.sink and optimize.sink on moto."""
    from genloop.stages import clean, evaluate, optimize, register, train, validate

    bucket = make_bucket(moto_server, "genloop-sink")
    ws = Workspace.at(tmp_path_factory.mktemp("ws"))
    cfg = load_params(None, [*TINY, "collect.dvc_add=false", f"generate.sink=s3://{bucket}/runs/generated",
                             f"optimize.sink=s3://{bucket}/runs/curated/"])
    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "GENLOOP_PARENT_RUN_ID", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(var, raising=False)
        mp.setenv("GENLOOP_S3_ENDPOINT_URL", moto_server)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        results = {}
        for stage in (collect, clean, validate, train, evaluate, register, generate, optimize):
            results[stage.__name__.rsplit(".", 1)[1]] = stage.run(cfg, ws)
        yield ws, cfg, results, bucket


def test_generate_uploads_the_batch_to_its_sink(sunk_pipeline: tuple, s3_env: str) -> None:
    ws, cfg, results, bucket = sunk_pipeline
    gen = results["generate"]
    version = gen["model_version"]
    local = folder(ws.generated / version)
    assert "manifest.parquet" in local and len(local) == cfg.generate.n + 2  # + manifest + grid
    assert gen["sink"] == f"s3://{bucket}/runs/generated/{version}"
    assert gen["sink_objects"] == len(local)
    assert objects(s3_env, bucket, f"runs/generated/{version}/") == local
    report = yaml.safe_load(ws.report("generate").read_text())
    assert report["sink"] == gen["sink"] and report["sink_objects"] == len(local)


def test_optimize_uploads_the_curated_batch_to_its_sink(sunk_pipeline: tuple, s3_env: str) -> None:
    ws, cfg, results, bucket = sunk_pipeline
    opt = results["optimize"]
    version = opt["model_version"]
    local = folder(ws.curated / version)
    assert "scores.parquet" in local
    assert opt["sink"] == f"s3://{bucket}/runs/curated/{version}"  # the trailing / of the sink is not doubled
    assert opt["sink_objects"] == len(local) == opt["kept"] + 1 + (1 if opt["kept"] else 0)
    assert objects(s3_env, bucket, f"runs/curated/{version}/") == local
    assert yaml.safe_load(ws.report("optimize").read_text())["sink"] == opt["sink"]


def test_generate_with_an_unwritable_sink_fails_naming_sink_and_endpoint(sunk_pipeline: tuple, s3_env: str) -> None:
    ws, cfg, results, bucket = sunk_pipeline
    report_before = ws.report("generate").read_bytes()
    bad = cfg.model_copy(deep=True)
    bad.generate.sink = "s3://no-such-sink-bucket/generated"
    with pytest.raises(SinkError) as info:
        generate.run(bad, ws)
    msg = str(info.value)
    assert f"s3://no-such-sink-bucket/generated/{results['generate']['model_version']}" in msg
    assert s3_env in msg and "GENLOOP_S3_ENDPOINT_URL" in msg
    assert ws.report("generate").read_bytes() == report_before  # a failed stage reports nothing


# ---------------------------------------------------------------- collect: all or nothing


def test_collect_leaves_no_partial_version_when_the_endpoint_dies_mid_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proc, endpoint = start_moto(tmp_path / "moto.log")
    try:
        monkeypatch.setenv("GENLOOP_S3_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        bucket = make_bucket(endpoint, "dying")
        s3 = client(endpoint)
        for i in range(20):
            s3.put_object(Bucket=bucket, Key=f"images/{i:03d}.png", Body=png(1000 + i))

        ws = git_dvc_repo(tmp_path / "repo")
        first = tmp_path / "first"
        write_pngs(first, range(5))
        v1 = collect.run(load_params(None, [f"collect.sources=['{first}']"]), ws)
        assert v1["added"] == 5 and v1["data_version"] != "untracked"
        before = snapshot(ws)

        write_pngs(first, range(5, 9))  # new local files: read fine, must not land in data/raw
        gets = 0

        def kill_after_five(**_: Any) -> None:
            nonlocal gets
            gets += 1
            if gets == 5:
                proc.kill()
                proc.wait()

        real = storage.s3_client

        def dying_client() -> Any:
            c = real()
            c.meta.events.register("after-call.s3.GetObject", kill_after_five)
            return c

        monkeypatch.setattr(collect, "s3_client", dying_client)
        cfg = load_params(None, [f"collect.sources=['{first}', 's3://{bucket}/images']"])
        start = time.monotonic()
        with pytest.raises(SourceUnreachable) as info:
            collect.run(cfg, ws)
        assert time.monotonic() - start < 90
        assert gets == 5 and endpoint in str(info.value)
        assert snapshot(ws) == before  # data/raw, ledger and data.dvc exactly as they were
        assert staged_files(ws) == []
    finally:
        proc.kill()
        proc.wait()


def test_collect_leaves_no_partial_version_when_a_later_source_is_missing(tmp_path: Path, s3_env: str) -> None:
    bucket = make_bucket(s3_env, "collect-ok")
    s3 = client(s3_env)
    for i in range(6):
        s3.put_object(Bucket=bucket, Key=f"imgs/{i}.png", Body=png(2000 + i))
    ws = git_dvc_repo(tmp_path / "repo")
    local = tmp_path / "local"
    write_pngs(local, range(3))
    collect.run(load_params(None, [f"collect.sources=['{local}']"]), ws)
    before = snapshot(ws)
    ledger_before = ws.ledger.read_bytes()

    write_pngs(local, range(3, 6))
    cfg = load_params(None, [f"collect.sources=['{local}', 's3://{bucket}/imgs', 's3://no-such-bucket/x']"])
    with pytest.raises(SourceError) as info:
        collect.run(cfg, ws)
    assert "s3://no-such-bucket/x" in str(info.value)
    assert not isinstance(info.value, Unreachable)
    assert snapshot(ws) == before and ws.ledger.read_bytes() == ledger_before
    assert staged_files(ws) == []

    # with the bad source gone, the same run publishes everything, and DVC agrees with data.dvc
    ok = collect.run(load_params(None, [f"collect.sources=['{local}', 's3://{bucket}/imgs']"]), ws)
    assert ok["added"] == 3 + 6 and ok["total"] == 12
    assert len([p for p in ws.raw.rglob("*.png")]) == 12
    assert staged_files(ws) == []
    raw_version = str(ok["data_version"]).split("+")[0]
    assert raw_version != yaml.safe_load(before["data.dvc"])["outs"][0]["md5"]  # type: ignore[arg-type]
    assert dvc(ws.root, "status", "--json", "data.dvc", "data/ledger.parquet.dvc").strip() == "{}"


# ---------------------------------------------------------------- DVC S3 remote


@pytest.fixture
def remote_repo(tmp_path: Path, s3_env: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Workspace, str, Path]:
    """A git+DVC workspace whose default remote is s3://<bucket>/dvc on moto; a folder of PNGs."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # moto takes any secret; this one must not leak
    bucket = make_bucket(s3_env, f"dvc-{tmp_path.name.lower().replace('_', '-')[-40:]}")
    ws = git_dvc_repo(tmp_path / "origin")
    dvc(ws.root, "remote", "add", "-d", "store", f"s3://{bucket}/dvc")
    src = tmp_path / "src"
    write_pngs(src, range(30))
    return ws, bucket, src


def test_dvc_push_and_pull_round_trip_through_an_s3_remote(
    remote_repo: tuple[Workspace, str, Path], s3_env: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ws, bucket, src = remote_repo
    summary = collect.run(load_params(None, [f"collect.sources=['{src}']", "collect.dvc_push=yes"]), ws)
    assert summary["pushed"] is True and summary["dvc_remote"] == f"s3://{bucket}/dvc"
    assert summary["added"] == 30
    pushed = objects(s3_env, bucket, "dvc/files/md5/")
    assert len(pushed) == 30 + 1 + 1  # every PNG, the ledger and the .dir listing
    assert sum(k.endswith(".dir") for k in pushed) == 1

    git(ws.root, "add", "data.dvc", "data/ledger.parquet.dvc", "data/.gitignore", ".dvc/config", ".dvc/.gitignore",
        ".dvcignore")
    git(ws.root, "commit", "-q", "-m", "data v1")
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(ws.root), str(clone))
    assert not (clone / "data" / "raw").exists()

    # what a user types in a fresh clone (the endpoint comes from GENLOOP_S3_ENDPOINT_URL only)
    pulled = subprocess.run([str(Path(sys.executable).parent / "genloop"), "pull"], cwd=clone,
                            capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stderr[-3000:]
    assert f"DVC remote 'store' (s3://{bucket}/dvc)" in pulled.stdout
    assert SECRET not in pulled.stdout + pulled.stderr
    assert folder(clone / "data" / "raw") == folder(ws.raw)  # same files, same bytes
    assert Workspace.at(clone).ledger.read_bytes() == ws.ledger.read_bytes()
    assert dvc(clone, "status", "--json", "data.dvc", "data/ledger.parquet.dvc").strip() == "{}"
    # the clone collects nothing new from the same source and pushes an up-to-date version
    again = collect.run(load_params(None, [f"collect.sources=['{src}']"]), Workspace.at(clone))
    assert again["added"] == 0 and again["pushed"] is True and again["data_version"] == summary["data_version"]

    # DVC got the endpoint without any of it being written down, and no credential leaked
    for repo in (ws.root, clone):
        assert not (repo / ".dvc" / "config.local").exists()
        assert "endpointurl" not in (repo / ".dvc" / "config").read_text()
        for path in [*(repo / ".dvc").glob("config*"), repo / "data.dvc", repo / "data" / "ledger.parquet.dvc",
                     repo / "reports" / "collect.json"]:
            assert SECRET not in path.read_text()
    assert SECRET not in caplog.text
    assert "s3://" in caplog.text  # the push/pull was logged (without the secret)


def test_dvc_push_to_an_unreachable_remote_is_retryable_and_names_what_to_fix(
    remote_repo: tuple[Workspace, str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, bucket, src = remote_repo
    collect.run(load_params(None, [f"collect.sources=['{src}']", "collect.dvc_push=no"]), ws)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("GENLOOP_S3_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    with pytest.raises(RemoteUnreachable) as info:
        dvc_remote.push(ws.root)
    assert time.monotonic() - start < 120
    msg = str(info.value)
    assert f"s3://{bucket}/dvc" in msg and endpoint in msg and "GENLOOP_S3_ENDPOINT_URL" in msg
    assert SECRET not in msg


def test_dvc_push_to_a_missing_bucket_is_not_retried(remote_repo: tuple[Workspace, str, Path], s3_env: str) -> None:
    ws, bucket, src = remote_repo
    dvc(ws.root, "remote", "modify", "store", "url", "s3://no-such-dvc-bucket/dvc")
    with pytest.raises(RemoteError) as info:
        collect.run(load_params(None, [f"collect.sources=['{src}']"]), ws)  # auto: the remote exists
    assert not isinstance(info.value, Unreachable)
    msg = str(info.value)
    assert "s3://no-such-dvc-bucket/dvc" in msg and s3_env in msg and "GENLOOP_S3_ENDPOINT_URL" in msg
    # the local version was made all the same; a later run (or `dvc push`) only has to push it
    assert len(list(ws.raw.rglob("*.png"))) == 30 and ws.data_dvc.exists()


def test_dvc_push_yes_without_a_remote_fails_before_any_work(tmp_path: Path) -> None:
    ws = git_dvc_repo(tmp_path / "repo")
    write_pngs(tmp_path / "src", range(3))
    with pytest.raises(RemoteError, match="dvc remote add -d"):
        collect.run(load_params(None, [f"collect.sources=['{tmp_path / 'src'}']", "collect.dvc_push=yes"]), ws)
    assert not ws.raw.exists() and not ws.data_dvc.exists()
    # auto without a remote: no push, no error
    summary = collect.run(load_params(None, [f"collect.sources=['{tmp_path / 'src'}']"]), ws)
    assert summary["pushed"] is False and summary["dvc_remote"] is None


def test_pull_without_a_remote_or_data_dvc_says_what_to_run(tmp_path: Path) -> None:
    ws = git_dvc_repo(tmp_path / "repo")
    with pytest.raises(RemoteError, match="genloop collect"):
        dvc_remote.pull(ws.root)
    ws.data_dvc.write_text("outs:\n- path: data/raw\n  md5: 0123456789abcdef0123456789abcdef.dir\n")
    with pytest.raises(RemoteError, match="dvc remote add -d"):
        dvc_remote.pull(ws.root)
    with pytest.raises(GenloopError, match="dvc init"):
        dvc_remote.pull(tmp_path)


def test_an_endpointurl_in_the_dvc_config_wins_over_the_environment(
    remote_repo: tuple[Workspace, str, Path], s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ws, bucket, src = remote_repo
    dvc(ws.root, "remote", "modify", "--local", "store", "endpointurl", s3_env)
    monkeypatch.setenv("GENLOOP_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # would fail if used
    summary = collect.run(load_params(None, [f"collect.sources=['{src}']", "collect.dvc_push=yes"]), ws)
    assert summary["pushed"] is True
    assert len(objects(s3_env, bucket, "dvc/files/md5/")) == 30 + 2
    assert os.environ["GENLOOP_S3_ENDPOINT_URL"] != s3_env
