"""The routes: the Draw and Run pages, /api/predict, /api/run, /api/report; limits; every error as JSON.

POST /api/predict takes an image (PNG from the page; any format ``distmnist predict`` reads) as
the raw request body and returns the digit, the ten probabilities and the 28 x 28 view the model
saw. Bad input is answered with a 4xx status and ``{"error": "..."}``, never a traceback:
400 unreadable, 413 too large (bytes or pixels), 415 a form upload, 422 no digit in it;
a full server answers 503 with Retry-After.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..digits import ImageTooLarge, NoDigit, quiet_pillow_bomb_warning, read_digit
from ..errors import DistmnistError
from .runview import Reports, run_state
from .weights import ServedWeights

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("distmnist.serve")


@dataclass
class Limits:
    upload_bytes: int  # request body of /api/predict
    pixels: int  # per image, checked from its header before decoding
    in_flight: int  # /api/predict requests accepted at once; more get 503
    workers: int  # threads decoding and classifying at once (CPU-bound: about the number of cores)
    poll_seconds: float  # how often the run folder is checked for new weights


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def create_app(run_dir: Path, data_dir: Path, limits: Limits) -> Starlette:
    quiet_pillow_bomb_warning()
    served = ServedWeights(run_dir)
    reports = Reports(data_dir)
    workers = anyio.CapacityLimiter(limits.workers)
    reporting = anyio.CapacityLimiter(1)  # a report takes about a second: it must not hold up predictions
    in_flight = 0

    async def watch() -> None:
        while True:
            await anyio.sleep(limits.poll_seconds)
            try:
                if await anyio.to_thread.run_sync(served.refresh):
                    log.warning("now serving %s", served.current.source)
            except Exception:  # a watcher that dies would freeze the model: log and keep watching
                log.exception("checking %s for new weights failed", run_dir)

    @asynccontextmanager
    async def lifespan(app):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch)
            yield
            tasks.cancel_scope.cancel()

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise HTTPException(400, f"Content-Length {declared!r} is not a number of bytes")
        if declared is not None and int(declared) > limits.upload_bytes:
            raise HTTPException(413, f"upload of {declared} bytes, over the limit of {limits.upload_bytes:,} bytes")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.upload_bytes:
                raise HTTPException(413, f"upload over the limit of {limits.upload_bytes:,} bytes")
        return bytes(body)

    def classify(body: bytes) -> dict:
        weights = served.current
        digit = read_digit(BytesIO(body), "upload", limits.pixels)
        probabilities = weights.log_probabilities(digit[None]).exp()[0]
        return {
            "digit": int(probabilities.argmax()),
            "probabilities": probabilities.tolist(),  # index = digit
            "image": digit.tolist(),  # 28 rows of 28 grey levels, 0 = background, 255 = ink
            "model": weights.describe(run_dir),
        }

    async def predict(request: Request) -> JSONResponse:
        nonlocal in_flight
        if in_flight >= limits.in_flight:
            return error(503, f"busy: {limits.in_flight} predictions in flight; try again", **{"Retry-After": "1"})
        in_flight += 1
        try:
            kind = request.headers.get("content-type", "")
            if kind.startswith("multipart/"):
                return error(415, "send the image as the request body, not as a form: "
                                  "curl --data-binary @digit.png -H 'Content-Type: image/png' URL")
            body = await read_body(request)
            if not body:
                return error(400, "empty request body: send a PNG image of one digit")
            if served.current is None:
                return error(503, f"no weights in {run_dir} yet (no checkpoint that verifies)",
                             **{"Retry-After": "5"})
            return JSONResponse(await anyio.to_thread.run_sync(classify, body, limiter=workers))
        except ImageTooLarge as err:
            return error(413, str(err))
        except NoDigit as err:
            return error(422, str(err))
        except DistmnistError as err:
            return error(400, str(err))
        finally:
            in_flight -= 1

    async def run(request: Request) -> JSONResponse:
        return JSONResponse(run_state(run_dir, served.current, served.problem))

    async def report(request: Request) -> JSONResponse:
        weights = served.current
        if weights is None:
            return error(503, f"no weights in {run_dir} yet (no checkpoint that verifies)", **{"Retry-After": "5"})
        try:
            return JSONResponse(await anyio.to_thread.run_sync(reports.get, weights, run_dir, limiter=reporting))
        except DistmnistError as err:  # the test set is missing or broken: the server's set-up, not the request
            return error(503, str(err))

    def page(name: str):
        async def endpoint(request: Request) -> FileResponse:
            return FileResponse(STATIC / name, headers={"Cache-Control": "no-cache"})
        return endpoint

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)  # the traceback goes to the log, not the client
        return error(500, "internal error (see the server's log)")

    routes = [
        Route("/", page("draw.html")),
        Route("/run", page("run.html")),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/run", run),
        Route("/api/report", report),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})
