"""The routes: the Draw and Run pages, /api/predict, /api/run, /api/report; limits; every error as JSON.

POST /api/predict takes an image (PNG from the page; JPEG, GIF or BMP too) as the raw request body
and returns the digit, the ten probabilities and the 28 x 28 view the model saw. Bad input is
answered with a 4xx status and ``{"error": "..."}``, never a traceback: 400 unreadable or a Host
that is not served (hosts.py), 413 too large (bytes or pixels), 415 a form upload, 422 no digit in
it; a full server answers 503 with Retry-After. A request counts as in flight once its body has
arrived: clients that send slowly are the connection guard's (guard.py), not the app's.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..digits import ImageTooLarge, NoDigit, quiet_pillow_bomb_warning, read_digit
from ..errors import DistmnistError
from .hosts import LOCAL_HOSTS, TrustedHosts
from .runview import Reports, run_state
from .weights import ServedWeights, Weights

STATIC = Path(__file__).parent / "static"
# What /api/predict decodes: formats whose decoding holds about one copy of the pixels (at most
# 4 bytes each). Pillow's WebP and TIFF decoders hold several, and the rarer formats are decoders
# that the network has no business reaching; predict reads them all.
FORMATS = ("PNG", "JPEG", "GIF", "BMP")
log = logging.getLogger("distmnist.serve")


@dataclass
class Limits:
    upload_bytes: int  # request body of /api/predict
    pixels: int  # per image, checked from its header before decoding
    in_flight: int  # /api/predict requests whose body has arrived, answered at once; more get 503
    workers: int  # threads decoding and classifying at once (CPU-bound: about the number of cores)
    poll_seconds: float  # how often the run folder is checked for new weights


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def no_weights(run_dir: Path) -> JSONResponse:
    return error(503, f"no weights in {run_dir} yet (no checkpoint that verifies)", **{"Retry-After": "5"})


class Predictions:
    """POST /api/predict: the body read within its limits, then counted in flight, decoded and
    classified on a worker thread."""

    def __init__(self, served: ServedWeights, run_dir: Path, limits: Limits):
        self.served = served
        self.run_dir = run_dir
        self.limits = limits
        self.workers = anyio.CapacityLimiter(limits.workers)
        self.in_flight = 0  # requests whose body has arrived and that are not answered yet

    async def post(self, request: Request) -> JSONResponse:
        if request.headers.get("content-type", "").startswith("multipart/"):
            return error(415, "send the image as the request body, not as a form: "
                              "curl --data-binary @digit.png -H 'Content-Type: image/png' URL")
        try:
            body = await self.read_body(request)
        except ClientDisconnect:  # gone, or too slow and disconnected by the guard: nobody reads this
            return error(400, "the client went away before its upload arrived")
        if not body:
            return error(400, "empty request body: send a PNG image of one digit")
        if self.in_flight >= self.limits.in_flight:
            return error(503, f"busy: {self.limits.in_flight} predictions in flight; try again", **{"Retry-After": "1"})
        self.in_flight += 1
        try:
            return await self.answer(body)
        finally:
            self.in_flight -= 1

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise HTTPException(400, f"Content-Length {declared!r} is not a number of bytes")
        if declared is not None and int(declared) > limit:
            raise HTTPException(413, f"upload of {declared} bytes, over the limit of {limit:,} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise HTTPException(413, f"upload over the limit of {limit:,} bytes")
        return bytes(body)

    async def answer(self, body: bytes) -> JSONResponse:
        weights = self.served.current
        if weights is None:
            return no_weights(self.run_dir)
        try:
            return JSONResponse(await anyio.to_thread.run_sync(self.classify, weights, body, limiter=self.workers))
        except ImageTooLarge as err:
            return error(413, str(err))
        except NoDigit as err:
            return error(422, str(err))
        except DistmnistError as err:
            return error(400, str(err))

    def classify(self, weights: Weights, body: bytes) -> dict[str, Any]:
        digit = read_digit(BytesIO(body), "upload", self.limits.pixels, FORMATS)
        probabilities = weights.log_probabilities(digit[None]).exp()[0]
        return {
            "digit": int(probabilities.argmax()),
            "probabilities": probabilities.tolist(),  # index = digit
            "image": digit.tolist(),  # 28 rows of 28 grey levels, 0 = background, 255 = ink
            "model": weights.describe(self.run_dir),
        }


Endpoint = Callable[[Request], Any]


def run_endpoint(served: ServedWeights, run_dir: Path) -> Endpoint:
    async def run(request: Request) -> JSONResponse:
        return JSONResponse(run_state(run_dir, served.current, served.problem))
    return run


def report_endpoint(served: ServedWeights, reports: Reports, run_dir: Path) -> Endpoint:
    reporting = anyio.CapacityLimiter(1)  # a report runs over the whole test set: it must not hold up predictions

    async def report(request: Request) -> JSONResponse:
        weights = served.current
        if weights is None:
            return no_weights(run_dir)
        try:
            return JSONResponse(await anyio.to_thread.run_sync(reports.get, weights, run_dir, limiter=reporting))
        except DistmnistError as err:  # the test set is missing or broken: the server's set-up, not the request
            return error(503, str(err))
    return report


def page(name: str) -> Endpoint:
    async def endpoint(request: Request) -> FileResponse:
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
    return endpoint


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, HTTPException):  # registered for HTTPException only
        return await server_error(request, exc)
    return error(exc.status_code, str(exc.detail))


async def server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)  # the traceback goes to the log, not the client
    return error(500, "internal error (see the server's log)")


async def watch(served: ServedWeights, seconds: float) -> None:
    """Look for newer weights every ``seconds`` while the server runs."""
    while True:
        await anyio.sleep(seconds)
        try:
            if await anyio.to_thread.run_sync(served.refresh) and served.current is not None:
                log.warning("now serving %s", served.current.source)
        except Exception:  # a watcher that dies would freeze the model: log and keep watching
            log.exception("checking %s for new weights failed", served.run_dir)


def lifespan(served: ServedWeights, seconds: float) -> Callable[[Starlette], Any]:
    @asynccontextmanager
    async def watching(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch, served, seconds)
            yield
            tasks.cancel_scope.cancel()
    return watching


def create_app(run_dir: Path, data_dir: Path, limits: Limits, hosts: Sequence[str] = LOCAL_HOSTS) -> Starlette:
    """The app for RUN_DIR, answering requests whose Host is one of ``hosts`` (see hosts.py)."""
    quiet_pillow_bomb_warning()
    served = ServedWeights(run_dir)
    routes = [
        Route("/", page("draw.html")),
        Route("/run", page("run.html")),
        Route("/api/predict", Predictions(served, run_dir, limits).post, methods=["POST"]),
        Route("/api/run", run_endpoint(served, run_dir)),
        Route("/api/report", report_endpoint(served, Reports(data_dir), run_dir)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan(served, limits.poll_seconds),
                     middleware=[Middleware(TrustedHosts, hosts=hosts)],
                     exception_handlers={HTTPException: http_error, Exception: server_error})
