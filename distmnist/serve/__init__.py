"""``distmnist serve RUN_DIR``: draw a digit in the browser and watch a run train (a small Starlette app).

    distmnist serve runs/mnist                          # http://127.0.0.1:8000/ (Draw) and /run (Run)
    python -m distmnist.serve runs/mnist --port 8080 --data-dir ../shared/mnist
    curl --data-binary @my-digit.png -H "Content-Type: image/png" http://127.0.0.1:8000/api/predict

    command.py   the command line: flags, checks, the socket, uvicorn
    guard.py     between socket and app: a deadline per request, a cap on connections, h11's refusals in JSON
    app.py       the routes: the two pages, /api/predict, /api/run, /api/report; limits and JSON errors
    hosts.py     the Host names answered (against DNS rebinding), the refusal in JSON
    weights.py   the served weights: verified, swapped only for newer weights that verify
    runview.py   what the Run page shows: metrics.jsonl, the plan, the test-set report per checkpoint
    static/      the pages: plain HTML, CSS and JavaScript, no build step, nothing from a CDN

Needs the ``serve`` extra (``pip install -e ".[serve]"``: Starlette and uvicorn).
"""

from .command import main

__all__ = ["main"]
