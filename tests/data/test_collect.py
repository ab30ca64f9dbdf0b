"""collect: builtin MNIST, local folders, S3 (a real moto server) and `dvc add`."""

from __future__ import annotations

import hashlib
import io
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from genloop.core.config import Params, load_params
from genloop.core.errors import SourceError, SourceUnreachable
from genloop.core.manifest import LEDGER_COLUMNS, read_ledger
from genloop.core.workspace import Workspace
from genloop.stages import collect

N_S3 = 1010  # more than one list_objects_v2 page (1000 keys)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_png(seed: int, size: int = 8) -> bytes:
    """A distinct tiny PNG per seed (the seed is spelled into the pixels, so no two collide)."""
    arr = np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)
    arr[0, :4] = np.frombuffer(seed.to_bytes(4, "big"), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def params(*overrides: str, dvc_add: bool = False) -> Params:
    return load_params(None, [f"collect.dvc_add={str(dvc_add).lower()}", *overrides])


def source(uri: str | Path, **extra: object) -> str:
    fields = ", ".join([f"uri: '{uri}'", *(f"{k}: {v}" for k, v in extra.items())])
    return f"collect.sources=[{{{fields}}}]"


def raw_files(ws: Workspace) -> list[Path]:
    return sorted(p for p in ws.raw.rglob("*") if p.is_file())  # the ledger lives beside data/raw


def assert_content_addressed(ws: Workspace, ledger: pd.DataFrame) -> None:
    files = raw_files(ws)
    assert len(files) == len(ledger)
    for path in files:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert path.stem == digest
        assert path.parent.name == digest[:2]
        assert path.parent.parent == ws.raw
    assert set(ledger["file"]) == {p.relative_to(ws.raw).as_posix() for p in files}
    for sha, rel in zip(ledger["sha256"], ledger["file"], strict=True):
        assert rel == f"{sha[:2]}/{sha}{Path(rel).suffix}"
    assert ledger["sha256"].is_unique


# ---------------------------------------------------------------- builtin:mnist


def test_builtin_mnist_with_limit_is_content_addressed(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    cfg = params(source("builtin:mnist", limit=50))
    summary = collect.run(cfg, ws)
    assert summary["added"] == 50 and summary["total"] == 50
    assert summary["sources"] == {"builtin:mnist": {"offered": 50, "added": 50}}
    assert summary["data_version"] == "untracked"

    ledger = read_ledger(ws.ledger)
    assert list(ledger.columns) == list(LEDGER_COLUMNS)
    assert len(ledger) == 50
    assert_content_addressed(ws, ledger)
    assert all(p.suffix == ".png" for p in raw_files(ws))
    assert (ledger["source"] == "builtin:mnist").all()
    assert ledger["original"].str.fullmatch(r"mnist/\d{5}\.png").all()
    assert ledger["original"].is_unique
    assert ledger["label"].notna().all()
    assert set(ledger["label"]) <= {str(d) for d in range(10)}
    assert ledger["collected_at"].notna().all()
    pd.to_datetime(ledger["collected_at"], utc=True)  # ISO-8601
    with Image.open(ws.raw / ledger["file"].iloc[0]) as img:
        assert img.size == (28, 28) and img.mode == "L"
    assert (ws.report("collect")).exists()

    # re-collecting the same source adds nothing and leaves the ledger untouched
    before = ws.ledger.read_bytes()
    again = collect.run(cfg, ws)
    assert again["added"] == 0 and again["total"] == 50
    assert again["sources"]["builtin:mnist"] == {"offered": 50, "added": 0}
    assert ws.ledger.read_bytes() == before
    assert len(raw_files(ws)) == 50


# ---------------------------------------------------------------- local folders


def test_local_directory_with_folder_labels(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected: dict[str, str] = {}
    for label, seeds in {"cat": [1, 2, 3], "dog": [4, 5]}.items():
        for seed in seeds:
            path = src / label / f"img{seed}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tiny_png(seed))
            expected[f"{label}/img{seed}.png"] = label
    (src / "dog" / "zz-copy.PNG").write_bytes(tiny_png(4))  # same bytes as dog/img4.png
    (src / ".hidden.png").write_bytes(tiny_png(99))
    (src / "top.jpeg").write_bytes(tiny_png(6))

    ws = Workspace.at(tmp_path / "ws")
    summary = collect.run(params(source(src, labels="folder")), ws)
    assert summary["sources"][str(src)] == {"offered": 7, "added": 6}

    ledger = read_ledger(ws.ledger)
    assert_content_addressed(ws, ledger)
    got = dict(zip(ledger["original"], ledger["label"], strict=True))
    assert {k: got[k] for k in expected} == expected
    assert pd.isna(got["top.jpeg"])  # not in a subfolder: no label
    assert ".hidden.png" not in got
    assert "dog/zz-copy.PNG" not in got  # its bytes were already collected as dog/img4.png
    assert (ledger["source"] == str(src)).all()
    assert {Path(f).suffix for f in ledger["file"]} == {".png", ".jpeg"}

    # without labels: folder names are not labels; file:// URIs work; nothing new
    summary = collect.run(params(source(f"file://{src}")), ws)
    assert summary["added"] == 0

    # one new file: exactly one ledger row more, older rows unchanged
    (src / "cat" / "img7.png").write_bytes(tiny_png(7))
    summary = collect.run(params(source(src, labels="folder")), ws)
    assert summary["added"] == 1 and summary["total"] == 7
    after = read_ledger(ws.ledger)
    pd.testing.assert_frame_equal(after.iloc[:6], ledger)
    assert after.iloc[6]["original"] == "cat/img7.png" and after.iloc[6]["label"] == "cat"


def test_local_directory_without_labels(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.png").write_bytes(tiny_png(1))
    ws = Workspace.at(tmp_path / "ws")
    collect.run(params(source(src)), ws)
    ledger = read_ledger(ws.ledger)
    assert ledger["label"].isna().all()


def test_unknown_scheme_names_supported_schemes(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    with pytest.raises(SourceError) as info:
        collect.run(params(source("ftp://x")), ws)
    msg = str(info.value)
    assert "ftp://x" in msg
    assert "builtin:mnist" in msg and "s3://" in msg and "local directory" in msg
    assert not ws.ledger.exists()


def test_missing_directory_names_path(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(SourceError) as info:
        collect.run(params(source(missing)), ws)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


def test_bad_source_fails_before_any_work(tmp_path: Path) -> None:
    """A bad second source stops collect before the first one is copied."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(tiny_png(1))
    ws = Workspace.at(tmp_path / "ws")
    cfg = params(f"collect.sources=['{src}', '{tmp_path / 'missing'}']")
    with pytest.raises(SourceError):
        collect.run(cfg, ws)
    assert not ws.raw.exists()


def test_file_instead_of_directory(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(tiny_png(1))
    with pytest.raises(SourceError, match="not a directory"):
        collect.run(params(source(path)), Workspace.at(tmp_path / "ws"))


# ---------------------------------------------------------------- dvc add


def _dvc_md5(ws: Workspace) -> str:
    """data.dvc's md5 of data/raw and data/ledger.parquet.dvc's of the ledger, as data_version joins them."""
    doc = yaml.safe_load(ws.data_dvc.read_text())
    assert len(doc["outs"]) == 1
    assert doc["outs"][0]["path"] == "data/raw"
    ledger = yaml.safe_load(ws.ledger_dvc.read_text())
    assert [o["path"] for o in ledger["outs"]] == ["ledger.parquet"]
    return f"{doc['outs'][0]['md5']}+{ledger['outs'][0]['md5']}"


def test_dvc_add_tracks_data_raw_in_top_level_data_dvc(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    src = tmp_path / "src"
    src.mkdir()
    for seed in range(5):
        (src / f"{seed}.png").write_bytes(tiny_png(seed))
    ws = Workspace.at(root)
    cfg = params(source(src), dvc_add=True)

    first = collect.run(cfg, ws)
    assert ws.data_dvc.exists()
    assert not (root / "data" / "raw.dvc").exists()
    md5 = _dvc_md5(ws)
    assert first["data_version"] == md5
    assert {"/raw", "/ledger.parquet"} <= set((root / "data" / ".gitignore").read_text().split())
    assert not (ws.raw / "ledger.parquet").exists()  # beside data/raw, not in it (see the repro test)

    # nothing new: data.dvc names the same version
    second = collect.run(cfg, ws)
    assert second["added"] == 0
    assert _dvc_md5(ws) == md5 == second["data_version"]
    assert not (root / "data" / "raw.dvc").exists()

    # new files: a new version
    (src / "new.png").write_bytes(tiny_png(100))
    third = collect.run(cfg, ws)
    assert third["added"] == 1
    new_md5 = _dvc_md5(ws)
    assert new_md5 != md5 and third["data_version"] == new_md5
    assert not (root / "data" / "raw.dvc").exists()

    # DVC itself agrees that data.dvc and the ledger's .dvc match the workspace
    status = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json", "data.dvc", "data/ledger.parquet.dvc"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    assert status.stdout.strip() == "{}"


def test_a_ledger_left_inside_data_raw_moves_beside_it_and_clean_says_so_until_then(tmp_path: Path) -> None:
    from genloop.core.errors import GenloopError, StageInputMissing
    from genloop.stages import clean

    src = tmp_path / "src"
    src.mkdir()
    for seed in range(3):
        (src / f"{seed}.png").write_bytes(tiny_png(seed))
    ws = Workspace.at(tmp_path / "ws")
    cfg = params(source(src))
    collect.run(cfg, ws)
    ws.ledger.rename(ws.legacy_ledger)  # where genloop kept it before: inside data/raw
    named = read_ledger(ws.legacy_ledger)
    with pytest.raises(StageInputMissing, match="collect moves it"):
        clean.run(cfg, ws)

    (src / "new.png").write_bytes(tiny_png(100))
    assert collect.run(cfg, ws)["added"] == 1
    assert not ws.legacy_ledger.exists()
    ledger = read_ledger(ws.ledger)
    assert ledger.iloc[:3].equals(named) and len(ledger) == 4  # the old rows kept, the new one added
    assert_content_addressed(ws, ledger)

    ws.legacy_ledger.write_bytes(ws.ledger.read_bytes())  # two ledgers: genloop does not pick one
    with pytest.raises(GenloopError, match="two ledgers"):
        collect.run(cfg, ws)
    assert read_ledger(ws.ledger).equals(ledger) and ws.legacy_ledger.exists()


def test_dvc_add_outside_a_dvc_repo_says_what_to_do(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(tiny_png(1))
    with pytest.raises(Exception, match="dvc init"):
        collect.run(params(source(src), dvc_add=True), Workspace.at(tmp_path / "ws"))


# ---------------------------------------------------------------- S3 (moto server)


@pytest.fixture(scope="session")
def s3_bucket(moto_server: str) -> dict[str, object]:
    """A bucket with N_S3 distinct PNGs under images/ (two 'folders') and one outside it."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        config=Config(max_pool_connections=8),
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    bucket = "genloop-test"
    client.create_bucket(Bucket=bucket)
    keys = {f"images/{'even' if i % 2 == 0 else 'odd'}/{i:05d}.png": tiny_png(i) for i in range(N_S3)}
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), keys.items()))
    client.put_object(Bucket=bucket, Key="other/outside.png", Body=tiny_png(N_S3 + 1))
    # sibling keys that share the string prefix "images" but are not in the images/ folder
    client.put_object(Bucket=bucket, Key="images-not-a-folder.png", Body=tiny_png(N_S3 + 2))
    client.put_object(Bucket=bucket, Key="images2/x.png", Body=tiny_png(N_S3 + 3))
    return {"bucket": bucket, "keys": keys}


def test_s3_prefix_collects_exactly_the_prefix(
    tmp_path: Path, s3_env: str, s3_bucket: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket = s3_bucket["bucket"]
    keys: dict[str, bytes] = s3_bucket["keys"]  # type: ignore[assignment]
    uri = f"s3://{bucket}/images"
    ws = Workspace.at(tmp_path)
    pages: list[str] = []
    real_client = collect.s3_client

    def counting_client() -> object:
        client = real_client()
        client.meta.events.register(
            "provide-client-params.s3.ListObjectsV2",
            lambda **kw: pages.append(kw["params"].get("ContinuationToken")),
        )
        return client

    monkeypatch.setattr(collect, "s3_client", counting_client)
    summary = collect.run(params(source(uri, labels="folder")), ws)
    assert summary["sources"][uri] == {"offered": N_S3, "added": N_S3}
    assert len(pages) == 2 and pages[0] is None and pages[1]  # the second page was fetched

    ledger = read_ledger(ws.ledger)
    assert len(ledger) == N_S3
    assert set(ledger["original"]) == {f"s3://{bucket}/{k}" for k in keys}
    assert (ledger["source"] == uri).all()
    by_original = dict(zip(ledger["original"], ledger["sha256"], strict=True))
    for key, data in keys.items():
        assert by_original[f"s3://{bucket}/{key}"] == hashlib.sha256(data).hexdigest()
    labels = dict(zip(ledger["original"], ledger["label"], strict=True))
    assert labels[f"s3://{bucket}/images/even/00000.png"] == "even"
    assert labels[f"s3://{bucket}/images/odd/00001.png"] == "odd"
    assert_content_addressed(ws, ledger)


def test_s3_limit(tmp_path: Path, s3_env: str, s3_bucket: dict[str, object]) -> None:
    uri = f"s3://{s3_bucket['bucket']}/images/"
    summary = collect.run(params(source(uri, limit=5)), Workspace.at(tmp_path))
    assert summary["added"] == 5
    ledger = read_ledger(Workspace.at(tmp_path).ledger)
    assert ledger["label"].isna().all()
    assert ledger["original"].str.startswith(f"s3://{s3_bucket['bucket']}/images/").all()


def test_s3_missing_bucket_is_a_source_error(tmp_path: Path, s3_env: str) -> None:
    with pytest.raises(SourceError) as info:
        collect.run(params(source("s3://no-such-bucket/x")), Workspace.at(tmp_path))
    assert "s3://no-such-bucket/x" in str(info.value)
    assert s3_env in str(info.value)
    assert not isinstance(info.value, SourceUnreachable)  # a missing bucket is not retried


def test_s3_unreachable_endpoint_is_a_bounded_source_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("GENLOOP_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    start = time.monotonic()
    with pytest.raises(SourceError) as info:
        collect.run(params(source("s3://bucket/prefix")), Workspace.at(tmp_path))
    elapsed = time.monotonic() - start
    msg = str(info.value)
    assert endpoint in msg
    assert "GENLOOP_S3_ENDPOINT_URL" in msg
    assert "s3://bucket/prefix" in msg
    assert elapsed < 60, f"took {elapsed:.0f} s to give up"
    assert isinstance(info.value, SourceUnreachable)  # the flow's retry condition retries this
