"""`genloop review` in a real headless Chromium (Playwright): click, keyboard, reload, then the store.

Runs the real command as a subprocess on a free port against a hand-made curated batch of MNIST
digits. With GENLOOP_SAVE_SCREENSHOT=1 it also writes docs/img/review.png (the README screenshot).
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from genloop.core.storage import sha256_file
from genloop.core.workspace import Workspace
from genloop.feedback.store import FeedbackStore
from tests.helpers import BIN, ROOT, cli_env
from tests.unit.test_review_app import PARAMS, VERSION, make_batch

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page, Response

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; `make test` installs it)")


@pytest.fixture
def review_server(tmp_path: Path) -> Iterator[tuple[Path, list[str], Callable[[], str], subprocess.Popen]]:
    """`genloop review --port 0` on a 24-image batch, starting in the background.

    Yields (workspace, ids, a function waiting for the printed URL, the process).
    """
    ws = tmp_path / "ws"
    ws.mkdir()
    ids = make_batch(ws, 24, side=64, digits=True)
    env = cli_env(ws)
    env.pop("GENLOOP_REVIEW_TOKEN", None)
    proc = subprocess.Popen(
        [str(BIN / "genloop"), "review", "-w", str(ws), "-p", str(PARAMS), "--port", "0", "--reviewer", "alice"],
        cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def url() -> str:
        line = lines.get(timeout=90)
        if line is None or "http://" not in line:
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"genloop review printed no URL: {line!r}\n{err[-4000:]}")
        return line.split("open ", 1)[1].split()[0]

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield ws, ids, url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_review_in_a_browser(review_server: tuple[Path, list[str], Callable[[], str], subprocess.Popen],
                             tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    ws, ids, wait_for_url, proc = review_server
    problems: list[str] = []

    def is_post(response: Response) -> bool:
        return response.url.endswith("/api/feedback") and response.request.method == "POST"

    def is_items(response: Response) -> bool:
        return "/api/items" in response.url

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 940})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            url = wait_for_url()  # the server started while Chromium did
            token = url.split("token=", 1)[1]
            assert url.startswith("http://127.0.0.1:") and len(token) >= 40
            with page.expect_response(is_items) as first:
                page.goto(url)
            assert first.value.ok
            cards = page.locator("article.card")
            expect(cards).to_have_count(24)
            expect(page.locator("#keys")).to_contain_text("accept")  # the shortcuts are on the page
            expect(cards.nth(0).locator("code")).to_have_text(ids[0])
            expect(cards.nth(0).locator(".scores")).to_contain_text("realism")

            # accept the first by clicking its button
            with page.expect_response(is_post) as saved:
                cards.nth(0).get_by_role("button", name="Accept").click()
            assert saved.value.status == 200
            expect(cards.nth(0)).to_have_attribute("data-decision", "accept")
            expect(cards.nth(0).locator(".badge")).to_have_text("accepted")

            # reject the second with the keyboard: focus it, press r
            cards.nth(1).locator("img").click()
            expect(cards.nth(1)).to_be_focused()
            with page.expect_response(is_post) as saved:
                page.keyboard.press("r")
            assert saved.value.status == 200
            expect(cards.nth(1)).to_have_attribute("data-decision", "reject")
            expect(cards.nth(2)).to_be_focused()  # "next after a decision" moved on

            # j / k move the focus; rate the third 4
            page.keyboard.press("j")
            expect(cards.nth(3)).to_be_focused()
            page.keyboard.press("k")
            expect(cards.nth(2)).to_be_focused()
            with page.expect_response(is_post) as saved:
                page.keyboard.press("4")
            assert saved.value.status == 200
            expect(cards.nth(2)).to_have_attribute("data-rating", "4")
            expect(cards.nth(2)).to_have_attribute("data-decision", "")
            expect(page.locator("#counts")).to_have_attribute("data-accepted", "1")

            # reload: what was reviewed is shown
            with page.expect_response(is_items) as reloaded:
                page.reload()
            assert reloaded.value.ok
            expect(cards).to_have_count(24)
            expect(cards.nth(0)).to_have_attribute("data-decision", "accept")
            expect(cards.nth(1)).to_have_attribute("data-decision", "reject")
            expect(cards.nth(2)).to_have_attribute("data-rating", "4")
            expect(cards.nth(2).locator(".stars button.on")).to_have_count(4)
            expect(cards.nth(3)).to_have_attribute("data-decision", "")
            expect(cards.nth(3)).to_have_attribute("data-rating", "")
            counts = page.locator("#counts")
            for key, value in (("accepted", "1"), ("rejected", "1"), ("rated", "1")):
                expect(counts).to_have_attribute(f"data-{key}", value)

            # every image is served (by id, with the token) and shown
            page.wait_for_function(
                "[...document.querySelectorAll('article.card img')].every(i => i.complete && i.naturalWidth > 0)")
            page.screenshot(path=str(tmp_path / "review.png"), animations="disabled")

            # the store holds exactly the three actions, with what the reviewer saw
            records = FeedbackStore.open("feedback", Workspace.at(ws)).records()
            folder = ws / "outputs" / "curated" / VERSION
            got = [(r.image_id, r.decision, r.rating, r.reviewer, r.model_name, r.model_version, r.sha256, r.source)
                   for r in records]
            assert got == [
                (ids[0], "accept", None, "alice", "genloop-generator", VERSION,
                 sha256_file(folder / f"{ids[0][3:]}.png"), "review"),
                (ids[1], "reject", None, "alice", "genloop-generator", VERSION,
                 sha256_file(folder / f"{ids[1][3:]}.png"), "review"),
                (ids[2], None, 4, "alice", "genloop-generator", VERSION,
                 sha256_file(folder / f"{ids[2][3:]}.png"), "review"),
            ]
            assert all(r.seed == 1000 + 10 * (int(r.image_id[3:]) // 10) for r in records)

            if os.environ.get("GENLOOP_SAVE_SCREENSHOT") == "1":
                _docs_screenshot(page, cards, is_post, is_items)
        finally:
            browser.close()
    assert problems == [], problems  # no script error, no CSP violation
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=15)
    assert token not in err, "the token was logged"


def _docs_screenshot(page: Page, cards: Locator, is_post: Callable[[Response], bool],
                     is_items: Callable[[Response], bool]) -> None:
    """A few more decisions, then docs/img/review.png for the README."""
    from playwright.sync_api import expect

    for i, keys in ((3, "a5"), (4, "a"), (5, "r"), (6, "a4"), (8, "3"), (9, "r")):
        for key in keys:
            cards.nth(i).locator("img").click()  # focus the card (a decision moves the focus on)
            with page.expect_response(is_post):
                page.keyboard.press(key)
    with page.expect_response(is_items):
        page.reload()
    expect(cards.nth(9)).to_have_attribute("data-decision", "reject")
    page.wait_for_function(
        "[...document.querySelectorAll('article.card img')].every(i => i.complete && i.naturalWidth > 0)")
    cards.nth(7).locator("img").click()
    target = ROOT / "docs" / "img" / "review.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target), animations="disabled")
