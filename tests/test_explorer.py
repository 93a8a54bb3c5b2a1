"""The explorer page at `/` on the HTTP port, in a real browser: Debian's Chromium driven
headless by Playwright (`make test` installs Chromium when missing), against a real server
serving the bundled quadratic and digits models. Screenshots go to build/explorer/ for a
person to look at."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import ServerProcess, keras_repository

from gradserve.server.config import BUNDLED_DIR, BUNDLED_MODEL

CHROMIUM = shutil.which("chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip
SHOTS = Path(__file__).resolve().parents[1] / "build" / "explorer"
WAIT_MS = 60_000

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (make test installs it)")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = keras_repository(
        tmp_path_factory.mktemp("explorer-repository"),
        {"quadratic": BUNDLED_MODEL, "digits": BUNDLED_DIR / "digits.keras"},
    )
    served = ServerProcess("--model-repository", str(root))
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser):
    opened = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.set_default_timeout(WAIT_MS)
    yield opened
    opened.close()
    assert errors == [], errors  # no script error on any page


def visit(page, server, query: str) -> None:
    page.goto(f"http://127.0.0.1:{server.http_port}/{query}")


def answered(page) -> str:
    page.wait_for_selector("#summary:not(:empty)")
    return page.inner_text("#summary")


def derivative_in(summary: str) -> float:
    return float(summary.split("dy/dx = ")[1].split(";")[0])


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_a_link_computes_at_once_and_shows_the_seeds_derivative(page, server):
    visit(page, server, "?model=quadratic&x=0.2&derivative=gradient")
    summary = answered(page)
    assert round(derivative_in(summary), 3) == -2.353, summary
    page.wait_for_selector("#curve path.d")  # the curve of dy/dx over x, drawn
    page.wait_for_selector("#check:not(:empty)")
    check = page.inner_text("#check")
    gap = float(check.split("relative gap ")[1].split(";")[0])
    assert gap < 1e-3, check  # the finite difference of the server's own outputs agrees
    assert "decode_us" in page.inner_text("#hops")
    page.click("[data-copy=curl]")
    assert '"derivative":"gradient"' in page.inner_text("#snippet")
    shot(page, "quadratic")


def test_an_image_is_explained_and_its_heat_map_drawn(page, server):
    visit(page, server, "")
    page.select_option("#model", "digits")
    page.wait_for_selector("#pad", state="visible")
    page.select_option("#derivative", "integrated_gradients")
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + 90, box["y"] + 40)
    page.mouse.down()
    for step in range(12):  # a stroke down the middle: a "1"
        page.mouse.move(box["x"] + 120, box["y"] + 40 + 15 * step)
    page.mouse.up()
    page.click("#compute")
    summary = answered(page)
    assert "completeness gap" in summary, summary
    coloured = page.evaluate("""() => {
        const data = document.getElementById('heat').getContext('2d')
            .getImageData(0, 0, 192, 192).data;
        let n = 0;
        for (let i = 0; i < data.length; i += 4) if (data[i + 3] > 0) n += 1;
        return n;
    }""")
    assert coloured > 0  # the attribution is painted
    assert "model=digits" in page.url and "derivative=integrated_gradients" in page.url
    shot(page, "digits")


def test_errors_from_the_server_and_the_page_are_readable(page, server):
    visit(page, server, "?model=no-such-model")
    page.wait_for_selector("#error:not([hidden])")
    assert 'serves no model named "no-such-model"' in page.inner_text("#error")
    visit(page, server, "?model=quadratic&x=0.5&derivative=vjp&v=[[1,2,3]]")
    page.wait_for_selector("#error:not([hidden])")
    message = page.inner_text("#error")
    assert message.startswith("400:") and "v" in message, message
    shot(page, "error")


def test_the_page_works_from_the_keyboard_and_keeps_its_state_in_the_url(page, server):
    visit(page, server, "?model=quadratic&x=0.2")
    answered(page)
    page.focus("#x")
    page.keyboard.press("Control+A")
    page.keyboard.type("0.6")
    page.keyboard.press("Enter")  # submits the form
    page.locator("#summary", has_text="dy/dx = 0.70").wait_for()
    assert "x=0.6" in page.url
    reopened = page.url
    page.goto("about:blank")
    page.goto(reopened)  # the link reproduces the view
    assert round(derivative_in(answered(page)), 2) == 0.71


class PrefixProxy:
    """A reverse proxy on a free loopback port that serves the server's HTTP port under
    PREFIX (as an ingress with a path prefix would), on a thread with its own event loop."""

    PREFIX = "/gradserve/"

    def __init__(self, upstream: str) -> None:
        import asyncio
        import threading

        self._upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the proxy did not start"

    def _run(self) -> None:
        import asyncio

        from aiohttp import ClientSession, web

        async def forward(request: web.Request) -> web.Response:
            path = request.path.removeprefix(self.PREFIX.rstrip("/"))
            async with ClientSession() as session, session.request(
                request.method, f"{self._upstream}{path or '/'}?{request.query_string}",
                data=await request.read(),
                headers={"content-type": request.headers.get("content-type", "")},
            ) as answer:  # fmt: skip
                body = await answer.read()
                kind = answer.headers.get("content-type", "application/octet-stream")
                return web.Response(status=answer.status, body=body,
                                    headers={"content-type": kind})  # fmt: skip

        async def serve() -> None:
            application = web.Application()
            application.router.add_route("*", self.PREFIX + "{tail:.*}", forward)
            runner = self._runner = web.AppRunner(application)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]
            self._ready.set()

        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    def close(self) -> None:
        """Close its connections and site, then stop its loop."""
        import asyncio

        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def test_the_page_works_behind_a_path_prefix(page, server):
    proxy = PrefixProxy(f"http://127.0.0.1:{server.http_port}")
    try:
        page.goto(f"http://127.0.0.1:{proxy.port}{proxy.PREFIX}?model=quadratic&x=0.2")
        assert round(derivative_in(answered(page)), 3) == -2.353
        assert page.url.startswith(f"http://127.0.0.1:{proxy.port}{proxy.PREFIX}?")
    finally:
        proxy.close()
