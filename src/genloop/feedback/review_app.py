"""review: a local web app to accept, reject and rate the latest curated batch in a browser.

`genloop review` serves outputs/curated/<version>/ as a paged gallery (a JSON API, images served
by id from disk on demand) on 127.0.0.1. Each click or key press is saved at once as one
FeedbackRecord in the feedback store (append-only: a local folder or an s3:// prefix).

Security: loopback only unless `allow_remote`; a random token (or GENLOOP_REVIEW_TOKEN) on every
request (header `X-Review-Token`, or `?token=` on GET requests; missing -> 401, wrong -> 403);
writes must come from the page's own origin (Origin, else Referer) with a JSON body; image ids
are checked (`check_image_id`) and only resolved to files of the batch folder; the Host header
must name a loopback host (no DNS rebinding); a strict Content-Security-Policy on the page.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import secrets
import socket
import threading
from base64 import b64encode
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from genloop.core.config import Params
from genloop.core.errors import GenloopError
from genloop.core.workspace import Workspace
from genloop.feedback.curated_batch import CuratedBatch, CuratedImage, latest_version
from genloop.feedback.store import FeedbackError, FeedbackRecord, FeedbackStore, check_image_id, latest

log = logging.getLogger(__name__)

TOKEN_ENV = "GENLOOP_REVIEW_TOKEN"
TOKEN_HEADER = "X-Review-Token"
DEFAULT_PAGE_SIZE = 60
MAX_PAGE_SIZE = 240
MAX_BODY_BYTES = 16_384
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
Show = Literal["all", "unreviewed", "accepted", "rejected", "rated", "undecided"]


class ReviewError(GenloopError):
    """The review app cannot start (bad host, port in use, no batch, weak token)."""


# ---------------------------------------------------------------------------------------------
# reviewer state: the feedback store, read once and kept current in memory


class ReviewState:
    """Every record of the store, folded per image (`latest`); updated in place on each action."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._by_image: dict[str, list[FeedbackRecord]] = {}
        self._current: dict[str, FeedbackRecord] = {}

    def reload(self) -> int:
        """Read the whole store again (other reviewers, imports); returns how many records it holds."""
        records = self.store.records()
        self._merge(records)
        return len(records)

    def append(self, record: FeedbackRecord) -> FeedbackRecord:
        """Write the record to the store, then fold it in; returns the image's new state."""
        self.store.append(record)  # outside the lock: the store itself is safe for concurrent writers
        self._merge([record])
        with self._lock:
            return self._current[record.image_id]

    def _merge(self, records: Iterable[FeedbackRecord]) -> None:
        with self._lock:
            touched = set()
            for r in records:
                if r.record_id in self._seen:
                    continue
                self._seen.add(r.record_id)
                self._by_image.setdefault(r.image_id, []).append(r)
                touched.add(r.image_id)
            for image_id in touched:  # refold: a record may arrive out of time order
                self._current[image_id] = latest(self._by_image[image_id])[image_id]

    def get(self, image_id: str) -> FeedbackRecord | None:
        with self._lock:
            return self._current.get(image_id)

    def snapshot(self, image_ids: Iterable[str]) -> dict[str, FeedbackRecord]:
        """The current state of these images (reviewed ones only)."""
        with self._lock:
            return {i: self._current[i] for i in image_ids if i in self._current}

    @property
    def size(self) -> int:
        with self._lock:
            return len(self._seen)


def _counts(batch: CuratedBatch, state: ReviewState) -> dict[str, int]:
    current = state.snapshot(batch.by_id)
    return {
        "total": len(batch),
        "reviewed": len(current),
        "unreviewed": len(batch) - len(current),
        "accepted": sum(r.decision == "accept" for r in current.values()),
        "rejected": sum(r.decision == "reject" for r in current.values()),
        "rated": sum(r.rating is not None for r in current.values()),
    }


def _state_json(record: FeedbackRecord | None) -> dict[str, Any]:
    if record is None:
        return {"decision": None, "rating": None, "reviewer": None, "time": None}
    return {"decision": record.decision, "rating": record.rating, "reviewer": record.reviewer,
            "time": record.time.isoformat()}


def _item_json(image: CuratedImage, record: FeedbackRecord | None) -> dict[str, Any]:
    return {"id": image.image_id, "file": image.file, "seed": image.seed, "label": image.label,
            "score": image.score, "realism": image.realism, "novelty": image.novelty,
            **_state_json(record)}


def _matches(show: str, record: FeedbackRecord | None) -> bool:
    if show == "all":
        return True
    if show == "unreviewed":
        return record is None
    if show == "undecided":
        return record is None or record.decision is None
    if record is None:
        return False
    if show == "rated":
        return record.rating is not None
    return record.decision == {"accepted": "accept", "rejected": "reject"}[show]


# ---------------------------------------------------------------------------------------------
# the page


def _page_html() -> tuple[str, str]:
    """The single-file page and its Content-Security-Policy (hashes of its inline script and style)."""
    html = resources.files("genloop.feedback").joinpath("review_static/index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
           "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")
    return html, csp


class Action(BaseModel):
    """A reviewer action posted by the page: a decision, a rating, or both, on one image."""

    model_config = ConfigDict(extra="forbid")

    image_id: str = Field(max_length=128)
    decision: Literal["accept", "reject"] | None = None
    rating: int | None = Field(None, ge=1, le=5, strict=True)
    reviewer: str | None = Field(None, min_length=1, max_length=100)


# ---------------------------------------------------------------------------------------------
# request guards


def _host_name(host_header: str) -> str:
    """`127.0.0.1:8765` -> 127.0.0.1, `[::1]:8765` -> ::1, lower-cased."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:].split("]", 1)[0]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _given_token(request: Request) -> str | None:
    header = request.headers.get(TOKEN_HEADER)
    if header:
        return header
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if request.method in SAFE_METHODS:  # <img src> and the first page load cannot send a header
        return request.query_params.get("token")
    return None


def _deny(status: int, detail: str, **headers: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)


def _write_refusal(request: Request) -> JSONResponse | None:
    """403 unless a write comes from the page's own origin; 415 unless its body is JSON; 411/413 on size."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}".lower()
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return _deny(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
    origin = request.headers.get("origin")
    if origin is not None:
        if origin.lower().rstrip("/") != own:
            return _deny(403, "cross-origin request refused: Origin is not this server")
    else:
        referer = request.headers.get("referer")
        if referer is None:
            return _deny(403, "request refused: a write needs an Origin or Referer header naming this server")
        if not (referer.lower() + "/").startswith(own + "/"):
            return _deny(403, "cross-origin request refused: Referer is not this server")
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/json":
        return _deny(415, "send the action as JSON (Content-Type: application/json)")
    length = request.headers.get("content-length")
    if length is None or not length.isdigit():
        return _deny(411, "a Content-Length is required")
    if int(length) > MAX_BODY_BYTES:
        return _deny(413, f"a body of at most {MAX_BODY_BYTES} bytes is accepted")
    return None


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}


# ---------------------------------------------------------------------------------------------
# the app


class _ReviewApi:
    """The review app's handlers and what they serve: one curated batch, its reviewer, the store's state."""

    def __init__(self, cfg: Params, ws: Workspace, batch: CuratedBatch, state: ReviewState, reviewer: str,
                 token: str, hosts: set[str] | None) -> None:
        self.cfg, self.ws, self.batch, self.state, self.reviewer = cfg, ws, batch, state, reviewer
        self.store = state.store
        self.html, self.csp = _page_html()
        self.hosts = hosts
        self.token_bytes = token.encode()

    def access_refusal(self, request: Request) -> JSONResponse | None:
        """403 for a foreign Host header, 401 without a token, 403 for a wrong one, else the write checks."""
        if self.hosts is not None and _host_name(request.headers.get("host", "")) not in self.hosts:
            return _deny(403, "unexpected Host header: open the URL `genloop review` printed")
        given = _given_token(request)
        if not given:
            return _deny(401, f"a token is required: open the URL `genloop review` printed "
                         f"(or send it in the {TOKEN_HEADER} header)", **{"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), self.token_bytes):
            return _deny(403, "wrong token: open the URL `genloop review` printed")
        return None if request.method in SAFE_METHODS else _write_refusal(request)

    async def guard(self, request: Request, call_next: Callable[[Request], Any]) -> Response:
        """The HTTP middleware: refuse unwelcome requests, pass the rest on, add the security headers."""
        response: Response = self.access_refusal(request) or await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def index(self) -> HTMLResponse:
        """GET /: the page, under its Content-Security-Policy."""
        return HTMLResponse(self.html, headers={"Content-Security-Policy": self.csp})

    def batch_info(self) -> dict[str, Any]:
        """GET /api/batch: the model, version, reviewer, store and counts of the batch."""
        batch, store = self.batch, self.store
        first = batch.images[0] if batch.images else None
        return {"model_name": first.model_name if first else self.cfg.registry.model_name,
                "model_version": batch.version, "reviewer": self.reviewer, "page_size": DEFAULT_PAGE_SIZE,
                "store": store.location if store.is_s3 else os.path.relpath(store.location, self.ws.root),
                "counts": _counts(batch, self.state)}

    def items(self, page: int = Query(1, ge=1), size: int = Query(DEFAULT_PAGE_SIZE, ge=1, le=MAX_PAGE_SIZE),
              show: Show = "all") -> dict[str, Any]:
        """GET /api/items: one page of the images that `show` selects, with their review state."""
        batch, state = self.batch, self.state
        if show == "all":
            chosen = batch.images
        else:
            now = state.snapshot(batch.by_id)
            chosen = [i for i in batch.images if _matches(show, now.get(i.image_id))]
        pages = max(1, -(-len(chosen) // size))
        page_images = chosen[(page - 1) * size: page * size]
        current = state.snapshot(i.image_id for i in page_images)
        return {"page": page, "pages": pages, "size": size, "total": len(chosen), "show": show,
                "items": [_item_json(i, current.get(i.image_id)) for i in page_images]}

    def image_or_error(self, image_id: str) -> CuratedImage:
        """The batch's image of this id; 400 for a malformed id, 404 for one not in the batch."""
        try:
            check_image_id(image_id)
        except ValueError as exc:
            raise HTTPException(400, str(exc)) from None
        image = self.batch.by_id.get(image_id)
        if image is None:
            raise HTTPException(404, f"no image {image_id} in the curated batch of version {self.batch.version}")
        return image

    def image_file(self, image_id: str) -> FileResponse:
        """GET /api/images/{image_id}: the image file, from the batch folder only."""
        image = self.image_or_error(image_id)
        try:
            path = self.batch.path(image)
        except FeedbackError as exc:
            raise HTTPException(404, str(exc)) from None
        if not path.is_file():
            raise HTTPException(404, f"image {image_id} is gone from {self.batch.folder}")
        return FileResponse(path, headers={"Cache-Control": "private, max-age=86400"})

    def post_feedback(self, action: Action) -> dict[str, Any]:
        """POST /api/feedback: save one action as a FeedbackRecord; the image's new state and the counts."""
        batch = self.batch
        image = self.image_or_error(action.image_id)
        if action.decision is None and action.rating is None:
            raise HTTPException(422, "send a decision (accept/reject), a rating (1-5), or both")
        try:
            record = FeedbackRecord(
                image_id=image.image_id, sha256=batch.sha256(image), model_name=image.model_name,
                model_version=image.model_version, seed=image.seed, decision=action.decision,
                rating=action.rating, reviewer=action.reviewer or self.reviewer, source="review")
            current = self.state.append(record)
        except FeedbackError as exc:
            log.error("review: could not save feedback on %s: %s", image.image_id, exc)
            raise HTTPException(503, f"feedback not saved: {exc}") from None
        except OSError as exc:
            raise HTTPException(404, f"image {image.image_id} cannot be read: {exc}") from None
        log.debug("review: %s %s rating=%s by %s", image.image_id, record.decision, record.rating, record.reviewer)
        return {"id": image.image_id, "record_id": record.record_id, **_state_json(current),
                "counts": _counts(batch, self.state)}

    def refresh(self) -> dict[str, Any]:
        """POST /api/refresh: read the store again (other reviewers' records); its size and the counts."""
        try:
            n = self.state.reload()
        except FeedbackError as exc:
            raise HTTPException(503, str(exc)) from None
        return {"records": n, "counts": _counts(self.batch, self.state)}


def _build_app(api: _ReviewApi) -> FastAPI:
    """A FastAPI app with the guard middleware and the routes of `api`."""
    app = FastAPI(title="genloop review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.batch = api.batch
    app.state.review = api.state
    app.middleware("http")(api.guard)
    app.get("/", response_class=HTMLResponse)(api.index)
    app.get("/api/batch")(api.batch_info)
    app.get("/api/items")(api.items)
    app.get("/api/images/{image_id}")(api.image_file)
    app.post("/api/feedback")(api.post_feedback)
    app.post("/api/refresh")(api.refresh)
    return app


def create_app(cfg: Params, ws: Workspace, token: str, reviewer: str, version: str | None = None, *,
               allowed_hosts: Iterable[str] | None = LOOPBACK_NAMES,
               store: FeedbackStore | None = None) -> FastAPI:
    """The review app for one curated batch (the latest one unless `version`).

    `allowed_hosts`: host names the Host header may carry (loopback names by default; None: any,
    for --allow-remote). The store is read once here and kept current in memory.
    """
    if not token:
        raise ReviewError("the review token must not be empty")
    reviewer = check_reviewer(reviewer)
    version = str(version) if version is not None else latest_version(ws)
    batch = CuratedBatch.load(ws, version, default_model_name=cfg.registry.model_name)
    store = store or FeedbackStore.open(cfg.feedback.store, ws)
    state = ReviewState(store)
    n_records = state.reload()
    hosts = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}
    api = _ReviewApi(cfg, ws, batch, state, reviewer, token, hosts)
    log.info("review: %d curated images of model version %s from %s; feedback store %s (%d records)",
             len(batch), version, batch.folder, store.location, n_records)
    return _build_app(api)


# ---------------------------------------------------------------------------------------------
# serving


def check_reviewer(name: str) -> str:
    """A reviewer name: 1-100 printable characters."""
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 100 or not name.isprintable():
        raise ReviewError(f"reviewer name {name!r} is not allowed: 1-100 printable characters")
    return name.strip()


def default_reviewer() -> str:
    """The login name, or 'reviewer'."""
    try:
        import getpass

        return getpass.getuser() or "reviewer"
    except Exception:
        return "reviewer"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless `allow_remote`."""
    if not is_loopback(host) and not allow_remote:
        raise ReviewError(
            f"refusing to serve on {host}: the review app listens on loopback (127.0.0.1) only, "
            "because anyone who can reach it and learns the token can read the batch and write feedback. "
            "Pass --allow-remote to serve on a non-loopback address (on a trusted network only), "
            "or forward the port over SSH (ssh -L 8765:127.0.0.1:8765 HOST)."
        )


def resolve_token(token: str | None = None) -> str:
    """The given token, else GENLOOP_REVIEW_TOKEN, else a fresh random one (32 bytes)."""
    token = token or os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(32)
    if len(token) < 16 or not re.fullmatch(r"[A-Za-z0-9_.~-]+", token):
        raise ReviewError(f"the review token ({TOKEN_ENV}) must be at least 16 URL-safe characters "
                          "(letters, digits, '-', '_', '.', '~')")
    return token


def review_url(host: str, port: int, token: str) -> str:
    """http://HOST:PORT/?token=... (the one place the token is shown)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/?token={token}"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets' connections (without it,
    # Nagle + delayed ACKs add ~40 ms to every keep-alive request)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(256)
        return sock
    except OSError as exc:
        sock.close()
        raise ReviewError(f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                          + (" (pass another --port, or --port 0 for a free one)" if port else "")) from exc


def prepare(cfg: Params, ws: Workspace, *, host: str = "127.0.0.1", port: int = 8765,
            reviewer: str | None = None, version: str | None = None, token: str | None = None,
            allow_remote: bool = False) -> tuple[Any, socket.socket, str]:
    """Check the host, build the app, listen: (uvicorn.Server, its listening socket, the URL to open).

    `server.run(sockets=[sock])` serves; the URL holds the token.
    """
    import uvicorn

    check_host(host, allow_remote)
    token = resolve_token(token)
    reviewer = check_reviewer(reviewer or default_reviewer())
    hosts = None if not is_loopback(host) else {*LOOPBACK_NAMES, host}
    if not is_loopback(host):
        log.warning("review: serving on %s (not loopback): anyone on the network with the token can write feedback",
                    host)
    app = create_app(cfg, ws, token, reviewer, version, allowed_hosts=hosts)
    sock = bind(host, port)
    # access_log off: its lines would show the ?token= of image requests
    config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False, proxy_headers=False,
                            timeout_graceful_shutdown=3, log_level="warning")
    return uvicorn.Server(config), sock, review_url(host, sock.getsockname()[1], token)


def serve(cfg: Params, ws: Workspace, *, host: str = "127.0.0.1", port: int = 8765, reviewer: str | None = None,
          version: str | None = None, token: str | None = None, allow_remote: bool = False,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Run the review app with uvicorn until interrupted; `on_ready(url)` once it listens.

    The URL holds the token: only `on_ready` sees it (the CLI prints it); nothing logs it.
    """
    server, sock, url = prepare(cfg, ws, host=host, port=port, reviewer=reviewer, version=version, token=token,
                                allow_remote=allow_remote)
    if on_ready is not None:
        on_ready(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
