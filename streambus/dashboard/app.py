"""The dashboard's web application: pages, live feeds (server-sent events), and actions.

Routes (every page is a static shell; its data arrives over SSE and is drawn by the page's
script, shipped in ``static/``):

* ``GET /``, ``GET /swarms/<swarm>``: the pages. A swarm id with characters an id cannot have
  is a 400 page, a swarm the namespace does not have a 404 page; neither touches a key.
* ``GET /events``, ``GET /swarms/<swarm>/events``: the live feeds (one shared poller each,
  see :mod:`streambus.dashboard.feeds`). Events: ``snapshot`` (JSON) and ``unavailable``.
* ``GET /api/swarms``, ``GET /api/swarms/<swarm>``: the latest snapshot as JSON, for scripts.
* ``POST /swarms/<swarm>/dead-letters/<id>/replay``: send a dead-lettered retry request again,
  under a new request id. Only with ``allow_actions``, and only with the header
  ``X-Streambus-Action: 1`` (which a cross-site form cannot send).
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from pathlib import Path
from string import Template
from typing import Any, Final

import msgspec
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from streambus.bus import Bus
from streambus.dashboard.feeds import Feed, Hub, Message
from streambus.dashboard.reads import (
    LATENCY_BOUNDS_MS,
    LOOP_NUMBERS,
    LOOP_STATES,
    DashboardOptions,
    SwarmWatch,
    dead_letter,
    overview,
    swarm_exists,
)
from streambus.errors import Backpressure, InvalidId, StreambusError
from streambus.keys import validate_id
from streambus.retries import new_request_id
from streambus.schema import RetryRequest, decode_fields

STATIC: Final = Path(__file__).parent / "static"
_ENTRY_ID: Final = re.compile(r"\d{1,20}-\d{1,20}")
_LOOPBACK: Final = ("127.0.0.1", "localhost", "::1", "[::1]")
_SECURITY_HEADERS: Final = {
    # Every script and style is a file of ours: no inline code, nothing from elsewhere.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _template(name: str) -> Template:
    return Template((STATIC / name).read_text(encoding="utf-8"))


class Dashboard:
    """The handlers, sharing one bus, one hub of feeds and the options."""

    def __init__(self, bus: Bus, hub: Hub, options: DashboardOptions) -> None:
        self.bus = bus
        self.hub = hub
        self.options = options
        self.pages = {name: _template(f"{name}.html") for name in ("overview", "swarm", "error")}

    def __repr__(self) -> str:
        return f"<Dashboard namespace={self.bus.namespace!r} {self.hub!r}>"

    # -- pages ---------------------------------------------------------------------------------

    def page(self, name: str, status: int = 200, **values: Any) -> HTMLResponse:
        config = {"namespace": self.bus.namespace, "dead_after": self.options.dead_after,
                  "allow_actions": self.options.allow_actions,
                  "latency_bounds_ms": LATENCY_BOUNDS_MS, "loop_states": LOOP_STATES,
                  "loop_numbers": LOOP_NUMBERS, **values}
        body = self.pages[name].substitute(
            {k: html.escape(str(v)) for k, v in values.items()},
            namespace=html.escape(self.bus.namespace),
            config=html.escape(json.dumps(config)))
        return HTMLResponse(body, status_code=status, headers=_SECURITY_HEADERS)

    def error_page(self, status: int, title: str, message: str) -> HTMLResponse:
        return self.page("error", status, code=status, title=title, message=message)

    async def index(self, request: Request) -> Response:
        return self.page("overview")

    async def swarm(self, request: Request) -> Response:
        swarm = request.path_params["swarm"]
        try:
            validate_id(swarm, "swarm id")
        except InvalidId as exc:
            return self.error_page(400, "Invalid swarm id", str(exc))
        try:
            known = await swarm_exists(self.bus, swarm)
        except StreambusError:
            known = True  # cannot tell now: the page shows the bus's state in its banner
        if not known:
            return self.error_page(
                404, "Unknown swarm",
                f"namespace {self.bus.namespace!r} has no swarm {swarm!r} (no coordinator, "
                "no channel)")
        return self.page("swarm", swarm=swarm)

    # -- live feeds ----------------------------------------------------------------------------

    def overview_feed(self) -> Feed:
        return self.hub.feed("overview", lambda: lambda: overview(self.bus, self.options))

    def swarm_feed(self, swarm: str) -> Feed:
        return self.hub.feed(f"swarm:{swarm}",
                             lambda: SwarmWatch(self.bus, swarm, self.options).read)

    async def overview_events(self, request: Request) -> Response:
        return _sse(self.overview_feed())

    async def swarm_events(self, request: Request) -> Response:
        swarm = request.path_params["swarm"]
        if not _valid(swarm):
            return _json_error(400, f"invalid swarm id {swarm!r}")
        return _sse(self.swarm_feed(swarm))

    async def overview_json(self, request: Request) -> Response:
        return await _latest(self.overview_feed())

    async def swarm_json(self, request: Request) -> Response:
        swarm = request.path_params["swarm"]
        if not _valid(swarm):
            return _json_error(400, f"invalid swarm id {swarm!r}")
        return await _latest(self.swarm_feed(swarm))

    # -- actions -------------------------------------------------------------------------------

    async def replay(self, request: Request) -> Response:
        """Send a dead-lettered retry request again, under a new request id."""
        if not self.options.allow_actions:
            return _json_error(403, "the dashboard is read-only: start it with --allow-actions")
        if request.headers.get("x-streambus-action") != "1":
            return _json_error(403, "an action needs the header X-Streambus-Action: 1")
        swarm, entry_id = request.path_params["swarm"], request.path_params["entry_id"]
        if not _valid(swarm) or not _ENTRY_ID.fullmatch(entry_id):
            return _json_error(400, "invalid swarm or dead-letter id")
        keys = self.bus.keys(swarm)
        try:
            entry = await self.bus.entry(keys.dead_letters, entry_id)
            if entry is None:
                return _json_error(404, f"no dead letter {entry_id} in swarm {swarm!r}")
            if not dead_letter(keys.prefix, entry)["replayable"]:
                return _json_error(409, "only a dead-lettered retry request can be replayed")
            request_ = decode_fields({k[len(b"orig."):]: v for k, v in (entry[1] or {}).items()
                                      if k.startswith(b"orig.")})
            assert isinstance(request_, RetryRequest)  # replayable says so
            sent = await self.bus.send_retry(swarm, msgspec.structs.replace(
                request_, request_id=new_request_id(), requested_by="dashboard"))
        except Backpressure as exc:
            return _json_error(409, str(exc))
        except StreambusError as exc:
            return _json_error(503, f"bus unavailable: {exc}")
        return JSONResponse({"replayed": entry_id, "request_id": sent.request_id,
                             "stream_id": sent.stream_id})

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/api/") or request.method != "GET":
            return _json_error(exc.status_code, exc.detail)
        return self.error_page(exc.status_code, "Not found" if exc.status_code == 404
                               else exc.detail, f"nothing at {request.url.path}")


def _valid(swarm: str) -> bool:
    try:
        validate_id(swarm, "swarm id")
    except InvalidId:
        return False
    return True


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _sse(feed: Feed) -> EventSourceResponse:
    async def events() -> Any:
        # aclosing: a browser that leaves unsubscribes now, not when the generator is collected
        async with contextlib.aclosing(feed.messages()) as messages:
            async for event, data in messages:
                yield {"event": event, "data": data}

    return EventSourceResponse(events(), ping=15)


async def _latest(feed: Feed) -> Response:
    async with contextlib.aclosing(feed.messages()) as messages:
        message: Message | None = await anext(messages, None)
    if message is None:
        return _json_error(503, "the dashboard is shutting down")
    event, data = message
    status = 200 if event == "snapshot" else 503
    return Response(data, status_code=status, media_type="application/json")


def create_app(bus: Bus, hub: Hub, options: DashboardOptions, *, host: str = "127.0.0.1"
               ) -> Starlette:
    """The dashboard's ASGI app over ``bus``; its feeds run in ``hub``.

    Bound to a loopback address, it answers only requests for a loopback host name (so a web
    page elsewhere cannot read it through DNS rebinding).
    """
    d = Dashboard(bus, hub, options)
    allowed = list(_LOOPBACK) if host in _LOOPBACK else ["*"]
    return Starlette(
        routes=[
            Route("/", d.index),
            Route("/events", d.overview_events),
            Route("/api/swarms", d.overview_json),
            Route("/api/swarms/{swarm}", d.swarm_json),
            Route("/swarms/{swarm}", d.swarm),
            Route("/swarms/{swarm}/events", d.swarm_events),
            Route("/swarms/{swarm}/dead-letters/{entry_id}/replay", d.replay,
                  methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed)],
        exception_handlers={HTTPException: d.http_error},
    )
