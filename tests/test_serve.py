"""distmnist serve: the API under hostile input, weights swapped only once they verify, and both pages
in a real headless Chromium (Debian's, driven by Playwright for Python).

The browser tests draw ten real test-set digits on the Draw page as mouse strokes (the digits
thinned to one-pixel lines and traced), read the page's answers, and watch the Run page follow a
training run that is still writing. Screenshots are kept under pytest's temporary folder (and in
$DISTMNIST_SCREENSHOTS when set). Without Chromium or Playwright the browser tests are skipped,
except under CI=true, where that is a failure.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_predict import draw_seven, png_bomb

from conftest import ROOT, checkpoint_state, env, stop_process
from distmnist.catalogue import checkpoint_name
from distmnist.checkpoint import save_weights, write_checkpoint
from distmnist.data import load_mnist
from distmnist.digits import read_digit
from distmnist.model import Net, to_input
from distmnist.serve import main as serve_main
from distmnist.serve.runview import read_epochs

pytest.importorskip("starlette", reason="needs the serve extra")
httpx = pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from distmnist.serve.app import Limits, create_app  # noqa: E402
from distmnist.serve.hosts import allowed_hosts  # noqa: E402

CHROMIUM = Path(os.environ.get("DISTMNIST_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]  # root on a closed network: no sandbox, no updates, no phoning home
LIMITS = Limits(upload_bytes=200_000, pixels=1_000_000, in_flight=64, workers=2, poll_seconds=0.05)


# ---------------------------------------------------------------- helpers


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def seven_png(size: int = 280) -> bytes:
    return png(draw_seven(size, ink=0, paper=255))


def trained_weights(seed: int) -> tuple[dict[str, torch.Tensor], torch.optim.SGD]:
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    F.nll_loss(model(to_input(images)), torch.tensor([1, 2, 3, 4])).backward()
    opt.step()
    return model.state_dict(), opt


def checkpoint_dir(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / checkpoint_name(epoch)


def add_checkpoint(run_dir: Path, epoch: int, seed: int) -> Path:
    weights, opt = trained_weights(seed)
    state = checkpoint_state(epoch=epoch, world=1, steps_per_epoch=10, config={})
    state.versions = {"device": "test-cpu"}
    return write_checkpoint(checkpoint_dir(run_dir, epoch), weights, opt.state_dict(),
                            {"cpu": torch.get_rng_state()[None]}, state)


@pytest.fixture
def run_dir(tmp_path, mnist_dir) -> Path:
    """A finished run with untrained weights, config.json pointing at the synthetic MNIST, two epochs of metrics."""
    run = tmp_path / "run"
    run.mkdir()
    config = {"data_dir": str(mnist_dir), "epochs": 2, "batch_size": 100, "lr": 0.01}
    (run / "config.json").write_text(json.dumps(config))
    (run / "metrics.jsonl").write_text("".join(json.dumps({
        "epoch": e, "train_loss": 1 / e, "test_loss": 1 / e, "test_accuracy": 0.5 + e / 10,
        "train_samples_per_second": 1000.0, "world_size": 1}) + "\n" for e in (1, 2)))
    save_weights(Net().state_dict(), run / "model.safetensors")
    return run


def local_client(app, **kw) -> TestClient:
    """A TestClient that names this machine in its Host header (the app answers no other name)."""
    return TestClient(app, base_url="http://localhost", **kw)


@pytest.fixture
def client(run_dir):
    with local_client(create_app(run_dir, run_dir / "unused", LIMITS), raise_server_exceptions=False) as c:
        yield c


def is_json_error(r, status: int | tuple[int, ...]) -> bool:
    statuses = status if isinstance(status, tuple) else (status,)
    body = r.json()
    return (r.status_code in statuses and r.headers["content-type"] == "application/json"
            and set(body) == {"error"} and "Traceback" not in body["error"] and "\n" not in body["error"])


# ---------------------------------------------------------------- the API


def test_predict_returns_the_digit_its_probabilities_and_the_view_predict_makes(client):
    body = seven_png()
    r = client.post("/api/predict", content=body, headers={"Content-Type": "image/png"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"digit", "probabilities", "image", "model"}
    assert len(answer["probabilities"]) == 10 and abs(sum(answer["probabilities"]) - 1) < 1e-5
    assert answer["digit"] == int(np.argmax(answer["probabilities"]))
    # the 28 x 28 view is exactly what distmnist predict makes of the same file (one shared preparation)
    assert torch.equal(torch.tensor(answer["image"], dtype=torch.uint8), read_digit(io.BytesIO(body)))
    assert answer["model"]["source"] == "model.safetensors"


def test_the_pages_and_their_files_are_served_from_the_package(client):
    for path, kind in (("/", "text/html"), ("/run", "text/html"), ("/static/draw.js", "javascript"),
                       ("/static/run.js", "javascript"), ("/static/style.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"], path
    for page in ("/", "/run"):  # offline: nothing from another host
        assert "http" not in client.get(page).text.replace('"http://www.w3.org', "")


def bmp_header_bomb() -> bytes:
    """A 54-byte BMP whose header claims 60000 x 60000 pixels."""
    return (b"BM" + (54).to_bytes(4, "little") + b"\0\0\0\0" + (54).to_bytes(4, "little") + (40).to_bytes(4, "little")
            + (60000).to_bytes(4, "little") + (60000).to_bytes(4, "little") + (1).to_bytes(2, "little")
            + (24).to_bytes(2, "little") + b"\0" * 24)


def blank_animation(frames: int, side: int) -> bytes:
    out = io.BytesIO()
    blank = [Image.new("L", (side, side), 255 * (k % 2)) for k in range(frames)]
    blank[0].save(out, format="GIF", save_all=True, append_images=blank[1:])
    return out.getvalue()


def webp(png_bytes: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(png_bytes)).save(out, format="WEBP")
    return out.getvalue()


HOSTILE = {
    "empty": (b"", 400),
    "text": (b"this is not a picture\n", 400),
    "html with a script": (b"<html><script>alert(1)</script></html>", 400),
    "json": (b'{"digit": 7}', 400),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><circle r="5"/></svg>', 400),
    "png signature only": (b"\x89PNG\r\n\x1a\n", 400),
    "truncated png": (seven_png()[:300], 400),
    "png with a broken crc": (seven_png()[:29] + b"\0\0\0\0" + seven_png()[33:], 400),
    "zeros": (b"\0" * 5000, 400),
    "blank canvas": (png(Image.new("L", (280, 280), 255)), 422),
    "transparent canvas": (png(Image.new("RGBA", (280, 280), (0, 0, 0, 0))), 422),
    "one pixel": (png(Image.new("L", (1, 1), 0)), 422),
    "bmp header bomb": (bmp_header_bomb(), 413),
    "blank frames past the pixel limit": (blank_animation(3, 1000), 413),  # 1,000,000 pixels each
    "blank frames": (blank_animation(3, 100), 422),
    "webp": (webp(seven_png()), 400),  # read by predict, not by serve
}


@pytest.mark.parametrize("name", HOSTILE)
def test_malformed_and_hostile_uploads_get_a_4xx_json_error(client, name):
    body, status = HOSTILE[name]
    r = client.post("/api/predict", content=body, headers={"Content-Type": "image/png"})
    assert is_json_error(r, status), (r.status_code, r.text)
    if status == 400 and body:
        assert "(PNG, JPEG, GIF, BMP)" in r.json()["error"]  # what serve reads
    assert "object at 0x" not in r.text  # no Python reprs either


def test_oversized_uploads_are_refused(client, tmp_path):
    bomb = png_bomb(tmp_path / "bomb.png", 12_000).read_bytes()  # 144 million pixels in a few KB
    r = client.post("/api/predict", content=bomb)
    assert is_json_error(r, 413) and "12000 x 12000" in r.json()["error"] and "1,000,000" in r.json()["error"]
    big = seven_png(2000) + b"\0" * LIMITS.upload_bytes
    r = client.post("/api/predict", content=big)  # Content-Length says too much: refused unread
    assert is_json_error(r, 413) and f"{LIMITS.upload_bytes:,} bytes" in r.json()["error"]

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(100):
            yield b"\0" * 10_000

    r = client.post("/api/predict", content=chunks())
    assert is_json_error(r, 413)
    r = client.post("/api/predict", files={"file": ("digit.png", seven_png(), "image/png")})
    assert is_json_error(r, 415) and "--data-binary" in r.json()["error"]
    assert is_json_error(client.get("/api/predict"), 405)
    assert is_json_error(client.get("/api/nothing"), 404)
    assert is_json_error(client.get("/static/../../../etc/passwd"), 404)
    assert is_json_error(client.post("/static/draw.js"), 405)


def test_only_this_machines_names_are_answered(run_dir):
    """A page elsewhere that points its own name at 127.0.0.1 (DNS rebinding) still sends that name as Host."""
    hosts = allowed_hosts("127.0.0.1", ["digits.example", "*.lan"])
    with local_client(create_app(run_dir, run_dir / "unused", LIMITS, hosts)) as client:
        for host in ("localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:8000", "LOCALHOST", "digits.example",
                     "box.lan:80"):
            assert client.get("/api/run", headers={"Host": host}).status_code == 200, host
        requests = (("GET", "/api/run"), ("GET", "/"), ("GET", "/static/draw.js"), ("POST", "/api/predict"))
        for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil", "lan", "[::2]"):
            for method, path in requests:
                r = client.request(method, path, headers={"Host": host}, content=seven_png())
                assert is_json_error(r, 400) and repr(host) in r.json()["error"], (host, path, r.text)
                assert "--allowed-host" in r.json()["error"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_uploads_never_get_a_500(client, data):
    original = seven_png(60)
    kind = data.draw(st.sampled_from(["random", "flipped", "cut", "spliced"]))
    if kind == "random":
        body = data.draw(st.binary(max_size=2000))
    elif kind == "flipped":
        where = data.draw(st.lists(st.integers(0, len(original) - 1), min_size=1, max_size=8))
        body = bytearray(original)
        for i in where:
            body[i] ^= data.draw(st.integers(1, 255))
        body = bytes(body)
    elif kind == "cut":
        body = original[: data.draw(st.integers(0, len(original)))]
    else:
        at = data.draw(st.integers(8, len(original)))
        body = original[:at] + data.draw(st.binary(min_size=1, max_size=200)) + original[at:]
    r = client.post("/api/predict", content=body)
    assert r.status_code in (200, 400, 413, 422), (r.status_code, r.text)
    if r.status_code == 200:  # the damage left a readable digit: a whole answer
        answer = r.json()
        assert set(answer) == {"digit", "probabilities", "image", "model"} and 0 <= answer["digit"] <= 9
        assert abs(sum(answer["probabilities"]) - 1) < 1e-5
    else:
        assert is_json_error(r, r.status_code), r.text


def test_weights_that_change_on_disk_are_served_only_once_they_verify(tmp_path, mnist_dir):
    run = tmp_path / "run"
    add_checkpoint(run, 1, seed=1)
    with local_client(create_app(run, mnist_dir, LIMITS)) as client:

        def served(expect: str) -> dict:
            deadline = time.monotonic() + 10
            while True:
                state = client.get("/api/run").json()
                answer = client.post("/api/predict", content=seven_png())
                if state["model"]["source"] == expect and answer.json()["model"]["source"] == expect:
                    return state
                assert time.monotonic() < deadline, (state, answer.text)
                time.sleep(0.05)

        first = served("checkpoints/epoch-0001")["model"]
        assert client.get("/api/run").json()["plan"]["device"] == "test-cpu"  # from the checkpoint while running

        bad = add_checkpoint(tmp_path / "elsewhere", 2, seed=2)  # a newer checkpoint, modified after it was written
        data = bytearray((bad / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (bad / "model.safetensors").write_bytes(bytes(data))
        os.replace(bad, checkpoint_dir(run, 2))  # appears at once, already modified
        time.sleep(0.5)  # ten looks at the folder
        state = served("checkpoints/epoch-0001")
        assert state["model"]["key"] == first["key"] and "epoch-0002" in state["model_problem"]

        add_checkpoint(run, 3, seed=3)
        third = served("checkpoints/epoch-0003")["model"]
        assert third["key"] != first["key"]

        (run / "model.safetensors").write_bytes(b"not safetensors at all")  # a broken final file
        time.sleep(0.5)
        state = served("checkpoints/epoch-0003")
        assert "not loaded" in state["model_problem"] and "model.safetensors" in state["model_problem"]

        weights, _ = trained_weights(4)
        save_weights(weights, run / "model.safetensors")
        assert served("model.safetensors")["model"]["key"] not in (first["key"], third["key"])


def test_the_report_is_computed_on_demand_and_cached_per_checkpoint(run_dir, mnist_dir, monkeypatch):
    from distmnist.serve.runview import Reports

    calls = []
    compute = Reports.compute
    monkeypatch.setattr(Reports, "compute", lambda self, w: calls.append(w.key) or compute(self, w))
    with local_client(create_app(run_dir, mnist_dir, LIMITS)) as client:
        assert calls == []  # nothing computed before it is asked for
        first = client.get("/api/report").json()
        _, test = load_mnist(mnist_dir, allow_download=False)
        assert first["samples"] == len(test) == sum(map(sum, first["confusion_matrix"]))
        assert [sum(row) for row in first["confusion_matrix"]] == torch.bincount(test.labels, minlength=10).tolist()
        assert first["correct"] == sum(first["confusion_matrix"][d][d] for d in range(10))
        for m in first["mistakes"]:
            assert m["label"] != m["predicted"] and m["image"] == test.images[m["index"]].tolist()
        assert client.get("/api/report").json() == first and len(calls) == 1  # cached
        weights, _ = trained_weights(5)
        save_weights(weights, run_dir / "model.safetensors")
        deadline = time.monotonic() + 10
        while client.get("/api/run").json()["model"]["key"] == first["model"]["key"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/api/report").json()["model"]["key"] != first["model"]["key"] and len(calls) == 2

    with local_client(create_app(run_dir, run_dir / "no-mnist-here", LIMITS)) as client:
        r = client.get("/api/report")
        assert is_json_error(r, 503) and "--data-dir" in r.json()["error"]


def test_metrics_lines_still_being_written_are_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "test_accuracy": 0.9}\n{"epoch": 2, "test_acc')
    assert [r["epoch"] for r in read_epochs(path)] == [1]
    assert read_epochs(tmp_path / "missing.jsonl") == []


def test_a_run_without_weights_yet_is_served_and_says_so(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"epochs": 5}')
    with local_client(create_app(run, tmp_path, LIMITS)) as client:
        state = client.get("/api/run").json()
        assert state["model"] is None and state["epochs"] == [] and not state["finished"]
        r = client.post("/api/predict", content=seven_png())
        assert is_json_error(r, 503) and "no weights" in r.json()["error"] and r.headers["retry-after"]


# ---------------------------------------------------------------- the command


def serve_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "distmnist.cli", "serve", *map(str, args)]


@contextmanager
def serving(run: Path, *args):
    """``distmnist serve RUN --port 0 ...`` in its own process; yields its base URL and the process."""
    proc = subprocess.Popen(serve_cmd(run, "--port", "0", *args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]  # serving RUN, what the pages are, the URL
        assert lines[0].startswith("serving ") and lines[2].startswith("http://"), "".join(lines) + proc.stderr.read()
        yield lines[2].strip().rstrip("/"), proc
    finally:
        stop_process(proc, timeout=10)


def test_command_errors_are_one_line(tmp_path, run_dir, capsys):
    def fails(*args) -> str:
        with pytest.raises(SystemExit) as exit:
            serve_main([str(a) for a in args])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "nowhere: no such run folder" in fails(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "not a distmnist run folder" in fails(tmp_path / "empty")
    assert "--max-pixels must be >= 1, got 0" in fails(run_dir, "--max-pixels", "0")
    assert "--port must be from 0 to 65535, got 70000" in fails(run_dir, "--port", "70000")
    assert "--port must be from 0 to 65535, got -1" in fails(run_dir, "--port", "-1")
    assert "--workers must be from 1 to 1024, got 0" in fails(run_dir, "--workers", "0")
    assert "--max-connections must be >= 1, got 0" in fails(run_dir, "--max-connections", "0")
    assert "--request-timeout must be a number of seconds > 0, got nan" in fails(run_dir, "--request-timeout", "nan")
    assert "--poll-seconds must be a number of seconds > 0, got inf" in fails(run_dir, "--poll-seconds", "inf")
    assert "invalid int value: 'eighty'" in fails(run_dir, "--port", "eighty")
    for bad in ("example.org:8000", "http://example.org", "ex*ample.org", ""):
        assert f"--allowed-host {bad!r}: give a host name" in fails(run_dir, "--allowed-host", bad)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}" in fails(run_dir, "--port", port)
    assert "cannot listen on " + "x" * 70 in fails(run_dir, "--host", "x" * 70 + ".example")  # IDNA refuses it
    (run_dir / "model.safetensors").write_bytes(b"\0" * 100)  # loaded once, verified, as evaluate does
    assert "not a valid safetensors file" in fails(run_dir)


def test_start_up_lines_fit_80_columns_with_the_url_on_its_own(run_dir, monkeypatch, capsys):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: served.append(sockets[0].getsockname()))
    assert serve_main([str(run_dir), "--host", "0.0.0.0", "--port", "0"]) == 0
    out, err = capsys.readouterr()
    port = served[0][1]
    assert err.splitlines() == [f"distmnist: warning: open to the network on 0.0.0.0:{port}, no password, no TLS",
                                "distmnist: warning: other machines must use a name given to --allowed-host"]
    lines = out.splitlines()
    assert lines[0].startswith("serving ") and len(lines[0]) <= 80
    assert lines[1:] == ["/ draws a digit, /run shows the run; Ctrl+C stops", f"http://0.0.0.0:{port}/"]
    assert serve_main([str(run_dir), "--host", "0.0.0.0", "--port", "0", "--allowed-host", "box.lan"]) == 0
    assert "--allowed-host" not in capsys.readouterr().err  # told how other machines reach it
    deep = run_dir.parent / ("a-very-long-folder-name-" * 4) / "runs" / "mnist"
    shutil.copytree(run_dir, deep)
    assert serve_main([str(deep), "--port", "0"]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # localhost: no warning
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].startswith("serving /") and lines[0].endswith("runs/mnist")
    assert "..." in lines[0] and len(f"serving {deep}") > 80  # the middle of the long path elided
    assert lines[-1] == f"http://127.0.0.1:{served[-1][1]}/"


async def burst(url: str, bodies: list[bytes]) -> tuple[list[httpx.Response], float]:
    """POST every body to /api/predict at once; returns the responses and the seconds they took."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        start = time.perf_counter()
        responses = await asyncio.gather(*(client.post("/api/predict", content=b, headers={"Content-Type": "image/png"})
                                           for b in bodies))
        return responses, time.perf_counter() - start


def canvas_png(image: np.ndarray) -> bytes:
    """A 28 x 28 test image as the Draw page sends it: dark ink on a white 280 x 280 canvas."""
    canvas = Image.new("L", (280, 280), 255)
    canvas.paste(Image.fromarray(255 - image).resize((200, 200), Image.Resampling.BILINEAR), (40, 40))
    return png(canvas)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.slow
def test_200_concurrent_predictions_on_localhost(trained_run, real_mnist, tmp_path):
    """Also the README's figure: requests/s with client and server on this machine, and server CPU per request."""
    _, test = load_mnist(real_mnist, allow_download=False)
    bodies = [canvas_png(test.images[i].numpy()) for i in range(200)]
    with serving(trained_run) as (url, server):
        rates, cpu_ms = [], []
        for _ in range(3):  # each round: 200 new connections at once, one request each
            cpu = cpu_seconds(server.pid)
            responses, seconds = asyncio.run(burst(url, bodies))
            assert [r.status_code for r in responses] == [200] * 200, {r.status_code: r.text for r in responses}
            rates.append(len(bodies) / seconds)
            cpu_ms.append(1000 * (cpu_seconds(server.pid) - cpu) / len(bodies))
        right = sum(r.json()["digit"] == int(test.labels[i]) for i, r in enumerate(responses))
    assert right >= 180, right  # the answers are real ones, not just 200s
    figure = {"concurrent": 200, "requests_per_second": [round(r, 1) for r in rates],
              "server_cpu_ms_per_request": [round(c, 2) for c in cpu_ms], "cpus": os.cpu_count(),
              "load_average": os.getloadavg()[0]}
    (tmp_path / "throughput.json").write_text(json.dumps(figure) + "\n")
    print(f"\n200 concurrent /api/predict requests, 3 rounds: {figure}")


@pytest.mark.slow
def test_a_full_server_answers_503_and_recovers(trained_run):
    body = seven_png()
    with serving(trained_run, "--max-in-flight", "3", "--workers", "1") as (url, _):
        responses, _ = asyncio.run(burst(url, [body] * 60))
        statuses = {r.status_code for r in responses}
        assert statuses == {200, 503}, statuses
        busy = next(r for r in responses if r.status_code == 503)
        assert is_json_error(busy, 503) and busy.headers["retry-after"] == "1"
        assert httpx.post(f"{url}/api/predict", content=body).status_code == 200


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def browser():
    """Debian's headless Chromium through Playwright; missing: skipped, or failed under CI=true."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = 'Playwright for Python is not installed (pip install -e ".[dev]")'
    if problem is None and not CHROMIUM.exists():
        problem = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests under CI=true: {problem}")
        pytest.skip(problem)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def keep(page, tmp_path: Path, name: str) -> Path:
    """A full-page screenshot under the test's folder, and in $DISTMNIST_SCREENSHOTS when set."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("DISTMNIST_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["DISTMNIST_SCREENSHOTS"]) / name)
    return path


def thin(mask: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning: a boolean image -> lines one pixel wide."""
    img = np.pad(mask, 1).astype(np.uint8)
    while True:
        changed = False
        for step in (0, 1):
            p = [np.roll(np.roll(img, -dy, 0), -dx, 1) for dy, dx in
                 ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))]  # P2..P9, clockwise from N
            b = sum(p)
            a = sum(((p[i] == 0) & (p[(i + 1) % 8] == 1)).astype(np.uint8) for i in range(8))
            if step == 0:
                keep_ = (p[0] * p[2] * p[4] == 0) & (p[2] * p[4] * p[6] == 0)
            else:
                keep_ = (p[0] * p[2] * p[6] == 0) & (p[0] * p[4] * p[6] == 0)
            delete = (img == 1) & (b >= 2) & (b <= 6) & (a == 1) & keep_
            if delete.any():
                img[delete] = 0
                changed = True
        if not changed:
            return img[1:-1, 1:-1].astype(bool)


def strokes(image: np.ndarray, scale: int = 4) -> list[list[tuple[float, float]]]:
    """A 28 x 28 MNIST digit as pen strokes: thinned, traced along its lines; points in 0..1 of the image."""
    big = np.asarray(Image.fromarray(image).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR)) > 100
    skeleton = thin(big)
    pixels = set(zip(*np.nonzero(skeleton), strict=True))

    def neighbours(p):
        return [(p[0] + dy, p[1] + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                if (dy or dx) and (p[0] + dy, p[1] + dx) in pixels]

    used: set[frozenset] = set()
    paths = []
    ends = sorted(p for p in pixels if len(neighbours(p)) == 1)
    for start in ends + sorted(pixels):
        while True:  # walk from here along edges not drawn yet
            path, here = [start], start
            while True:
                step = next((n for n in neighbours(here) if frozenset((here, n)) not in used), None)
                if step is None:
                    break
                used.add(frozenset((here, step)))
                path.append(step)
                here = step
            if len(path) == 1:
                break
            paths.append(path)
    if not paths and pixels:
        paths = [[min(pixels)]]
    side = 28 * scale
    return [[((x + 0.5) / side, (y + 0.5) / side) for y, x in path[::3] + ([path[-1]] if len(path) % 3 != 1 else [])]
            for path in paths]


def wait_for_answer(page) -> str:
    answered = "document.body.dataset.drawn && document.body.dataset.drawn === document.body.dataset.predicted"
    page.wait_for_function(answered, timeout=20_000)
    return page.inner_text("#digit")


@pytest.mark.slow
def test_digits_drawn_with_the_mouse_are_read_on_the_draw_page(browser, trained_run, real_mnist, tmp_path):
    _, test = load_mnist(real_mnist, allow_download=False)
    chosen = [int((test.labels == d).nonzero()[0]) for d in range(10)]  # the first test image of each digit
    with serving(trained_run) as (url, _):
        page = browser.new_page(viewport={"width": 1000, "height": 760})
        page.goto(url + "/")
        box = page.locator("#pad").bounding_box()
        answers = []
        for i in chosen:
            for stroke in strokes(test.images[i].numpy()):
                x, y = stroke[0]
                page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
                page.mouse.down()
                for x, y in stroke[1:]:
                    page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
                page.mouse.up()
            answers.append(wait_for_answer(page))
            seen = page.evaluate("Array.from(document.getElementById('view').getContext('2d')"
                                 ".getImageData(0, 0, 28, 28).data.filter((_, k) => k % 4 === 0))")
            assert max(seen) == 255 and seen[0] == 0  # the 28 x 28 view shows bright ink on black
            if i == chosen[-1]:
                shot = keep(page, tmp_path, "serve-draw.png")
            page.click("#clear")
        labels = [int(test.labels[i]) for i in chosen]
        right = sum(a == str(t) for a, t in zip(answers, labels, strict=True))
        print(f"\ndrawn test digits {labels}, read on the page as {answers}: {right} of 10 right")
        assert right >= 9, list(zip(labels, answers, strict=True))
        assert shot.stat().st_size > 10_000
        assert page.inner_text("#digit") == "?" and page.is_disabled("#undo")  # cleared

        # undo takes back the last stroke: a 1 with a long base becomes a plain 1 and reads as one
        page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.15 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.85 * box["height"], steps=12)
        page.mouse.up()
        assert wait_for_answer(page) == "1"
        page.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + 0.5 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + 0.9 * box["width"], box["y"] + 0.5 * box["height"], steps=12)
        page.mouse.up()
        crossed = wait_for_answer(page)
        page.click("#undo")
        assert wait_for_answer(page) == "1" and crossed != "?"
        page.close()


@pytest.mark.slow
def test_the_draw_page_on_a_phone_with_a_finger(browser, trained_run, tmp_path):
    with serving(trained_run) as (url, _):
        context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True,
                                      device_scale_factor=2)
        page = context.new_page()
        page.goto(url + "/")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        box = page.locator("#pad").bounding_box()
        assert box["width"] >= 300  # the pad takes the phone's width
        cdp = context.new_cdp_session(page)
        points = [(0.5, 0.12 + 0.76 * k / 15) for k in range(16)]  # one finger stroke, top to bottom: a 1
        at = [{"x": box["x"] + x * box["width"], "y": box["y"] + y * box["height"]} for x, y in points]
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [at[0]]})
        for p in at[1:]:
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [p]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        assert wait_for_answer(page) == "1"
        keep(page, tmp_path, "serve-draw-phone.png")
        page.goto(url + "/run")
        page.wait_for_selector("#epochs[data-count='1']")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        context.close()


@pytest.mark.slow
def test_the_run_page_shows_a_new_epoch_while_training_writes(browser, real_mnist, tmp_path):
    out = tmp_path / "live"
    train = subprocess.Popen(
        [sys.executable, "-m", "distmnist.train", "--data-dir", str(real_mnist), "--no-download", "--epochs", "40",
         "--limit-train", "3000", "--limit-test", "1000", "--output-dir", str(out), "--progress", "none"],
        cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not read_epochs(out / "metrics.jsonl"):
            assert train.poll() is None, train.stderr.read()
            assert time.monotonic() < deadline, "no epoch written in 120 s"
            time.sleep(0.2)
        with serving(out, "--poll-seconds", "0.2") as (url, _):
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url + "/run?poll=500")
            page.wait_for_selector("#epochs[data-count]:not([data-count='0'])")
            first = int(page.get_attribute("#epochs", "data-count"))
            assert page.inner_text("#state") == "training" and "/ 40" in page.inner_text("#epochs")
            page.wait_for_function(f"Number(document.getElementById('epochs').dataset.count) > {first}",
                                   timeout=90_000)
            assert train.poll() is None  # the run is still going: the page followed it live
            assert page.locator("#chart-loss polyline").count() == 2  # train and test loss, two points or more
            plan = page.inner_text("#plan")
            assert "world size\t1" in plan and "learning rate\t0.01" in plan and "checkpoints/epoch-" in plan
            page.click("#report-button")  # the report of the newest checkpoint, on the full test set
            page.wait_for_selector("table.confusion")
            assert "of 10,000 test images" in page.inner_text("#report-note")
            assert page.locator(".mistakes figure").count() == 24
            keep(page, tmp_path, "serve-run.png")
            page.close()
    finally:
        train.terminate()
        train.wait(timeout=30)
