"""distmnist serve against hostile clients: a real server process on localhost, driven over raw sockets.

Clients whose body or headers never finish hold no prediction slot and are dropped after
--request-timeout (408 in JSON); connections beyond --max-connections are answered 503; a foreign
Host header (DNS rebinding) and requests that h11 cannot parse get a JSON error; and 20 uploads at
once of the costliest image under the pixel limit keep the server's peak memory within its budget
(printed with -s). Every wait here is bounded in count and in time.
"""

from __future__ import annotations

import io
import json
import selectors
import socket
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from test_predict import draw_seven
from test_serve import serving, seven_png

from distmnist import digits
from distmnist.checkpoint import save_weights
from distmnist.digits import read_digit
from distmnist.model import Net
from distmnist.serve.command import MAX_PIXELS

pytest.importorskip("uvicorn", reason="needs the serve extra")

REQUEST_TIMEOUT = 2.0  # --request-timeout of the servers here, seconds
WORKERS = 2  # --workers: the memory budget is per worker
MB = 2**20
# What one decode may cost at the pixel limit. The costliest upload is a GIF of two frames, the first
# blank: Pillow decodes the second in RGB over an RGB copy of the first, some 8 bytes per pixel of
# the limit in all; a single RGBA PNG costs its 4 bytes per pixel once. Plus the small copies, the
# model's forward pass and what the allocator keeps.
DECODE_BUDGET = 8 * MAX_PIXELS + 32 * MB


def peak_budget(uploads: int, upload_bytes: int) -> int:
    """The most the server's resident memory may grow while `uploads` such uploads are answered."""
    return WORKERS * DECODE_BUDGET + uploads * 2 * upload_bytes + 32 * MB  # a body is read once, then copied


# ---------------------------------------------------------------- a server and raw HTTP


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``distmnist serve`` on a free port of 127.0.0.1; yields (port, process)."""
    run = tmp_path_factory.mktemp("hostile") / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 1}))
    save_weights(Net().state_dict(), run / "model.safetensors")
    with serving(run, "--request-timeout", REQUEST_TIMEOUT, "--workers", WORKERS,
                 "--allowed-host", "digits.example") as (url, proc):
        yield int(url.rsplit(":", 1)[1]), proc
    log = proc.stderr.read()  # after it stopped: all it wrote
    assert "Traceback" not in log and "Exception" not in log, log[-3000:]


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_all(sock: socket.socket, seconds: float = 30) -> bytes:
    """Everything the server sends until it closes the connection (within `seconds`)."""
    sock.settimeout(seconds)
    chunks = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with connect(port) as sock:
        sock.sendall(request)
        return parse(read_all(sock))


def post(port: int, body: bytes, host: str = "localhost") -> tuple[int, dict[str, str], bytes]:
    return exchange(port, (f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
                           f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)


def json_error(answer: tuple[int, dict[str, str], bytes], statuses: tuple[int, ...]) -> str:
    """The message of a JSON error answer {"error": "..."} with one of `statuses`; fails otherwise."""
    status, headers, body = answer
    assert status in statuses and headers["content-type"] == "application/json", answer
    message = json.loads(body)
    assert set(message) == {"error"} and "\n" not in message["error"] and "Traceback" not in message["error"]
    return message["error"]


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a process, in bytes (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak(pid: int) -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- slow clients


SLOW_BODY = b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\nabcd"  # 996 bytes short
SLOW_HEAD = b"POST /api/predict HTTP/1.1\r\nHost: loc"


def answers_within(socks: list[socket.socket], seconds: float) -> dict[socket.socket, tuple[bytes, float]]:
    """What each socket receives until the server closes it, and when it closed (monotonic); bounded by `seconds`."""
    selector = selectors.DefaultSelector()
    received: dict[socket.socket, bytearray] = {}
    for sock in socks:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        received[sock] = bytearray()
    closed: dict[socket.socket, tuple[bytes, float]] = {}
    deadline = time.monotonic() + seconds
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            chunk = key.fileobj.recv(65536)
            if chunk:
                received[key.fileobj] += chunk
            else:
                closed[key.fileobj] = (bytes(received[key.fileobj]), time.monotonic())
                selector.unregister(key.fileobj)
    selector.close()
    return closed


@pytest.mark.slow
def test_slow_clients_hold_no_slot_and_are_dropped(server):
    port, proc = server
    socks: list[socket.socket] = []
    try:
        opened = time.monotonic()
        for request in [SLOW_BODY] * 300 + [SLOW_HEAD] * 50 + [b""] * 50:  # more than --max-in-flight (256)
            sock = connect(port)
            sock.sendall(request)
            socks.append(sock)
        started = time.monotonic()
        status, _, body = post(port, seven_png())
        answered = time.monotonic() - started
        assert status == 200 and json.loads(body)["digit"] in range(10)
        assert answered < 5, f"a real prediction took {answered:.1f} s behind 400 slow clients"

        closed = answers_within(socks, REQUEST_TIMEOUT + 20)
        assert len(closed) == len(socks), f"{len(socks) - len(closed)} slow clients still connected"
        for sock, (response, at) in closed.items():
            if socks.index(sock) < 350:  # sent part of a request: told why
                assert "the request did not arrive within 2 s" in json_error(parse(response), (408,))
            else:  # sent nothing: closed without a word
                assert response == b""
            assert at - opened >= REQUEST_TIMEOUT - 0.1  # not before their time
        print(f"\nprediction answered in {answered:.2f} s while 400 slow clients were connected; all dropped "
              f"{max(at for _, at in closed.values()) - opened:.1f} s after they connected")
    finally:
        for sock in socks:
            sock.close()
    assert post(port, seven_png())[0] == 200 and proc.poll() is None


@pytest.mark.slow
def test_connections_beyond_the_cap_get_503_until_slow_ones_are_dropped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    save_weights(Net().state_dict(), run / "model.safetensors")
    with serving(run, "--max-connections", "20", "--request-timeout", REQUEST_TIMEOUT) as (url, _):
        port = int(url.rsplit(":", 1)[1])
        idle = [connect(port) for _ in range(30)]
        try:
            busy = post(port, seven_png())
            assert "over 20 connections" in json_error(busy, (503,)) and busy[1]["retry-after"] == "1"
            deadline = time.monotonic() + REQUEST_TIMEOUT + 20
            while (status := post(port, seven_png())[0]) == 503 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert status == 200  # the idle ones were dropped after --request-timeout
        finally:
            for sock in idle:
                sock.close()


# ---------------------------------------------------------------- foreign hosts and malformed requests


def test_a_foreign_host_gets_a_json_400(server):
    port, _ = server
    for host in (f"evil.example:{port}", "127.0.0.1.evil.example", f"localhost.evil:{port}"):
        refusal = exchange(port, f"GET /api/run HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert repr(host) in json_error(refusal, (400,))
        assert "--allowed-host" in json_error(post(port, seven_png(), host=host), (400,))
    assert "no Host header" in json_error(exchange(port, b"GET /api/run HTTP/1.0\r\n\r\n"), (400,))
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "digits.example"):  # --allowed-host
        status, _, body = exchange(port, f"GET /api/run HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        assert status == 200 and "epochs" in json.loads(body), host


PREDICT = b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\n"
MALFORMED = {  # name: (request, statuses, words of the message)
    "negative Content-Length": (PREDICT + b"Content-Length: -5\r\n\r\n", (400,), "bad Content-Length"),
    "Content-Length not a number": (PREDICT + b"Content-Length: 5x\r\n\r\n", (400,), "bad Content-Length"),
    "two Content-Lengths": (PREDICT + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", (400,), "conflicting"),
    "no Host": (b"GET /api/run HTTP/1.1\r\n\r\n", (400,), "Host"),
    "headers over 16 KB": (b"GET /api/run HTTP/1.1\r\nHost: localhost\r\nX: " + b"a" * 20_000, (431,), "too long"),
    "TLS to http": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40 + b"\r\n\r\n", (400,), "request line"),
    "broken chunk": (PREDICT + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", (400,), "illegal chunk header"),
    "gzip transfer coding": (PREDICT + b"Transfer-Encoding: gzip\r\n\r\n", (501,), "chunked"),
    "after a good one": (b"GET /api/run HTTP/1.1\r\nHost: localhost\r\n\r\n" + PREDICT + b"Content-Length: -1\r\n\r\n",
                         (400,), "bad Content-Length"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_requests_h11_cannot_parse_get_a_json_error(server, name):
    port, _ = server
    request, statuses, words = MALFORMED[name]
    with connect(port) as sock:
        sock.sendall(request)
        response = read_all(sock)
    if name == "after a good one":  # kept alive: the first answer, then the refusal
        first, _, response = response.partition(b"}HTTP/1.1 ")
        assert first.startswith(b"HTTP/1.1 200 OK") and response
        response = b"HTTP/1.1 " + response
    answer = parse(response)
    assert words in json_error(answer, statuses) and answer[1]["connection"] == "close"
    assert "bytearray" not in answer[2].decode()  # no Python reprs of what was sent


# ---------------------------------------------------------------- the costliest decodes


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def rgba_png(width: int, height: int) -> bytes:
    """An RGBA PNG, transparent but for one thick stroke (a 1): the most memory per pixel of the formats
    served (4 bytes), written a row at a time, some 70 KB for 16 million pixels."""
    blank = b"\0" + b"\0\0\0\0" * width
    inked = bytearray(blank)
    inked[1 + 4 * (width // 2) : 1 + 4 * (width // 2 + width // 16)] = b"\0\0\0\xff" * (width // 16)
    packer = zlib.compressobj(9)
    rows = (packer.compress(bytes(inked) if height // 5 < y < 4 * height // 5 else blank) for y in range(height))
    data = b"".join(rows) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8 bits, RGBA
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def photo_jpeg(width: int, height: int) -> bytes:
    """A phone-sized photo of a dark 1 on light paper."""
    image = Image.new("L", (width, height), 220)
    ImageDraw.Draw(image).rectangle((width // 2, height // 5, width // 2 + width // 30, 4 * height // 5), fill=30)
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()


def two_frame_gif(width: int, height: int) -> bytes:
    """A GIF of two frames, the first blank, the second a 1 (every frame of a GIF is the whole canvas)."""
    blank = Image.new("L", (width, height), 255)
    one = blank.copy()
    ImageDraw.Draw(one).rectangle((width // 2, height // 5, width // 2 + width // 16, 4 * height // 5), fill=0)
    out = io.BytesIO()
    blank.save(out, format="GIF", save_all=True, append_images=[one])
    return out.getvalue()


def burst(port: int, body: bytes, count: int) -> tuple[list[tuple[int, dict[str, str], bytes]], float]:
    """`count` uploads of `body` at once, each on its own connection; the answers and the seconds they took."""
    started = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        answers = list(pool.map(lambda _: post(port, body), range(count)))
    return answers, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["two-frame GIF", "RGBA PNG"])
def test_the_costliest_uploads_stay_within_the_memory_budget(server, kind):
    port, proc = server
    side = int((MAX_PIXELS // 2) ** 0.5) if kind == "two-frame GIF" else int(MAX_PIXELS**0.5)
    worst = two_frame_gif(side, side) if kind == "two-frame GIF" else rgba_png(side, side)  # at the limit
    assert post(port, seven_png())[0] == 200  # warm: the first answer loads what every later one uses
    peak_known = reset_peak(proc.pid)
    before = memory(proc.pid)
    base = before["VmRSS"] if peak_known else before["VmHWM"]

    answers, seconds = burst(port, worst, 20)
    after = memory(proc.pid)
    assert [status for status, _, _ in answers] == [200] * 20, answers[0]
    assert len({json.loads(body)["digit"] for _, _, body in answers}) == 1  # the same answer each time
    budget = peak_budget(20, len(worst))
    print(f"\n20 uploads at once of a {side} x {side} {kind} ({len(worst) // 1000} KB), {WORKERS} workers: "
          f"answered in {seconds:.1f} s; server RSS {before['VmRSS'] / MB:.0f} MB before, peak "
          f"{after['VmHWM'] / MB:.0f} MB (+{(after['VmHWM'] - base) / MB:.0f} MB; budget +{budget / MB:.0f} MB)")
    assert after["VmHWM"] - base <= budget, f"the peak grew by {(after['VmHWM'] - base) / MB:.0f} MB"


def test_images_over_the_limit_cost_nothing_and_a_phone_photo_reads_small(server):
    port, proc = server
    peak = memory(proc.pid)["VmHWM"]
    bomb = rgba_png(7000, 7000)  # 49 million pixels in about 200 KB: over the limit, refused from its header
    started = time.monotonic()
    assert "7000 x 7000 = 49,000,000 pixels" in json_error(post(port, bomb), (413,))
    assert time.monotonic() - started < 2
    status, _, body = post(port, photo_jpeg(6000, 4000))  # 24 MP: over the limit at full size, read at 1/4
    assert status == 200 and json.loads(body)["digit"] in range(10)
    assert memory(proc.pid)["VmHWM"] - peak < 64 * MB


def large_variant(kind: str, side: int) -> bytes:
    """A hand-drawn 7, `side` pixels square, as a file of one kind."""
    seven = draw_seven(side, ink=30, paper=235)
    out = io.BytesIO()
    if kind == "JPEG":
        seven.convert("RGB").save(out, format="JPEG", quality=90)
    elif kind == "transparent":
        canvas = Image.new("RGBA", seven.size, (0, 0, 0, 0))
        canvas.putalpha(Image.eval(seven, lambda v: 255 - v))
        canvas.save(out, format="PNG")
    elif kind == "I;16":
        Image.eval(seven, lambda v: v).convert("I").point(lambda v: v * 200).convert("I;16").save(out, format="PNG")
    elif kind == "1":
        seven.point(lambda v: 255 * (v > 128)).convert("1", dither=Image.Dither.NONE).save(out, format="PNG")
    elif kind.startswith("rotated"):  # stored on its side, with the EXIF tag that turns it upright
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise to display
        seven.transpose(Image.Transpose.ROTATE_90).save(out, format=kind.split()[1], exif=exif.tobytes())
    else:
        seven.convert(kind).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("kind", ["L", "RGB", "P", "1", "transparent", "I;16", "JPEG", "rotated PNG", "rotated TIFF"])
def test_a_large_image_shrunk_as_it_is_decoded_reads_as_at_full_size(kind, monkeypatch):
    data = large_variant(kind, 2100)  # over twice WORK_SIDE: a JPEG decodes at 1/2, the others are reduced by 3
    shrunk = read_digit(io.BytesIO(data), kind)
    monkeypatch.setattr(digits, "WORK_SIDE", 10**6)  # every step at full size, as before the shrinking
    full = read_digit(io.BytesIO(data), kind)
    difference = (shrunk.int() - full.int()).abs()
    assert difference.float().mean() < 1 and difference.max() <= 16, (kind, difference.float().mean(), difference.max())
    upright = read_digit(io.BytesIO(large_variant("L", 2100)), "upright")
    assert (shrunk.int() - upright.int()).abs().float().mean() < 2  # the rotated ones turned upright
