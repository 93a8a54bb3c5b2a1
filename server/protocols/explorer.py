"""The explorer page on the HTTP port: `/` and its three files, served from package data
(`server/explorer/`), read once. The page itself talks only the v2 REST protocol of the same
port, by paths relative to it, so it works behind a path prefix and with TLS."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

FOLDER = Path(__file__).resolve().parents[1] / "explorer"
PAGE = "/"
ASSETS = "/explorer/{name}"
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
# The page runs only its own files and talks only to this origin.
_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
           "script-src 'self'; connect-src 'self'")  # fmt: skip


class Explorer:
    """The page's files, by name, and the routes that answer them."""

    def __init__(self, folder: Path = FOLDER) -> None:
        self._files = {path.name: path.read_bytes() for path in folder.iterdir()
                       if path.suffix in _TYPES}  # fmt: skip

    def routes(self) -> list[web.RouteDef]:
        return [web.get(PAGE, self.page), web.get(ASSETS, self.asset)]

    async def page(self, request: web.Request) -> web.Response:
        return self._answer("index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in self._files:
            raise web.HTTPNotFound(text=f"no file {name!r} in the explorer")
        return self._answer(name)

    def _answer(self, name: str) -> web.Response:
        headers = {"Content-Security-Policy": _POLICY, "Cache-Control": "no-cache"}
        kind = _TYPES[Path(name).suffix]
        return web.Response(body=self._files[name], content_type=kind, charset="utf-8",
                            headers=headers)  # fmt: skip
