"""A bounded load test of a served app: N concurrent clients each load the page and post a few callbacks.

Used by ``tests/test_app.py`` (20 clients against the app on a free 127.0.0.1 port) and by
``benchmarks/app_concurrency.py``. Standard library only (``urllib``); every request has a timeout, every client a
fixed number of requests, so a run always ends by itself.

A callback request is the body the dash renderer posts to ``/_dash-update-component``, built from the app's own
``/_dash-dependencies`` (so it tracks the page's callbacks): ``page_bodies`` for the runs, head-map and pattern
views, ``view_bodies`` for the live views behind buttons (interventions, ablation scoring, vision). A response
counts as an error when it is not HTTP 200, when the request fails, or when a callback's response carries a traceback
or an ``internal error`` message.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from flask import got_request_exception
from werkzeug.serving import make_server

from attnlab.apps import ids

PAGE_GETS = ("", "_dash-layout", "_dash-dependencies")
UPDATE = "_dash-update-component"


@dataclass(frozen=True)
class Sample:
    """One request: what it was, its HTTP status (0 = no response), seconds, and an error text ('' = fine)."""

    what: str
    status: int
    seconds: float
    error: str = ""
    busy: bool = False  # a live callback answered with the page's "busy" message (live runs are one at a time)


@dataclass
class LoadReport:
    """Counts and latency of a load run (seconds)."""

    clients: int
    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.samples)

    @property
    def errors(self) -> list[Sample]:
        return [s for s in self.samples if s.error]

    def quantile(self, q: float, what: str | None = None) -> float:
        xs = sorted(s.seconds for s in self.samples if what is None or s.what == what)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]

    def summary(self) -> dict[str, Any]:
        kinds = sorted({s.what for s in self.samples})
        return {
            "clients": self.clients,
            "requests": self.requests,
            "errors": len(self.errors),
            "busy": sum(s.busy for s in self.samples),
            "wall_s": round(self.wall_s, 3),
            "requests_per_s": round(self.requests / self.wall_s, 1) if self.wall_s else None,
            "p50_ms": round(1000 * self.quantile(0.5), 1),
            "p95_ms": round(1000 * self.quantile(0.95), 1),
            "max_ms": round(1000 * max((s.seconds for s in self.samples), default=float("nan")), 1),
            "by_request": {
                k: {
                    "n": sum(s.what == k for s in self.samples),
                    "p50_ms": round(1000 * self.quantile(0.5, k), 1),
                    "p95_ms": round(1000 * self.quantile(0.95, k), 1),
                }
                for k in kinds
            },
        }

    def lines(self) -> list[str]:
        s = self.summary()
        out = [
            f"{s['clients']} clients: {s['requests']} requests, {s['errors']} errors, {s['busy']} busy answers, "
            f"wall {s['wall_s']} s, p50 {s['p50_ms']} ms, p95 {s['p95_ms']} ms, max {s['max_ms']} ms"
        ]
        out += [
            f"  {k or '/'}: n={v['n']} p50 {v['p50_ms']} ms p95 {v['p95_ms']} ms" for k, v in s["by_request"].items()
        ]
        out += [f"  error: {e.what} status {e.status}: {e.error}" for e in self.errors[:5]]
        return out


def callback_body(dependencies: list[dict], output: str, values: dict[str, Any], changed: list[str]) -> dict:
    """The ``/_dash-update-component`` body of the callback whose output string contains ``output``.

    ``values`` maps ``"component-id.property"`` to the value sent for that input or state (missing ones are None);
    ``changed`` lists the ``"id.property"`` that triggered it.
    """
    dep = next((d for d in dependencies if output in d["output"]), None)
    if dep is None:
        raise KeyError(f"no callback with output {output!r}")

    def item(x):
        return {"id": x["id"], "property": x["property"], "value": values.get(f"{x['id']}.{x['property']}")}

    outs = [{"id": o.split(".")[0], "property": o.split(".")[1]} for o in dep["output"].strip(".").split("...")]
    return {
        "output": dep["output"],
        "outputs": outs if dep["output"].startswith("..") else outs[0],
        "inputs": [item(x) for x in dep["inputs"]],
        "state": [item(x) for x in dep.get("state", [])],
        "changedPropIds": list(changed),
    }


def _request(url: str, body: dict | None, timeout: float) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def timed(what: str, url: str, body: dict | None, timeout: float) -> Sample:
    """One request (GET, or POST of a JSON body), timed and judged (see the module docstring)."""
    t0 = time.perf_counter()
    try:
        status, payload = _request(url, body, timeout)
    except urllib.error.HTTPError as e:
        return Sample(what, e.code, time.perf_counter() - t0, f"HTTP {e.code}")
    except Exception as e:  # refused, reset, timed out: a failed request, counted
        return Sample(what, 0, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    dt = time.perf_counter() - t0
    if status != 200:
        return Sample(what, status, dt, f"HTTP {status}")
    if body is not None:
        text = payload.decode("utf-8", "replace")
        if "Traceback" in text or "internal error" in text:
            return Sample(what, status, dt, "error message in the response: " + text[:200])
        return Sample(what, status, dt, busy='"busy' in text)
    return Sample(what, status, dt)


def run_load(
    base_url: str, bodies: dict[str, dict], *, clients: int = 20, rounds: int = 2, timeout: float = 30.0
) -> LoadReport:
    """``clients`` threads start together; each GETs the page, layout and dependencies, then posts every body of
    ``bodies`` (name -> callback body) ``rounds`` times. Returns every request's sample.

    Bounded: ``clients * (3 + rounds * len(bodies))`` requests, each with ``timeout`` seconds.
    """
    base = base_url.rstrip("/") + "/"
    report = LoadReport(clients=clients)
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client() -> None:
        got = []
        try:
            start.wait(timeout)
        except threading.BrokenBarrierError:
            pass
        for path in PAGE_GETS:
            got.append(timed(path, base + path, None, timeout))
        for _ in range(rounds):
            for name, body in bodies.items():
                got.append(timed(name, base + UPDATE, body, timeout))
        with lock:
            report.samples.extend(got)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout * (len(PAGE_GETS) + rounds * len(bodies)) + timeout)
    report.wall_s = time.perf_counter() - t0
    return report


def dependencies(base_url: str, timeout: float = 30.0) -> list[dict]:
    status, payload = _request(base_url.rstrip("/") + "/_dash-dependencies", None, timeout)
    return json.loads(payload)


def page_bodies(
    deps: list[dict],
    run: str,
    result: str,
    *,
    compare: str | None = None,
    head: dict | None = None,
    prompt: str | None = "0",
) -> dict[str, dict]:
    """The callbacks a visitor's page posts: pick a run, draw the head map (and its difference with ``compare``),
    and the selected head's pattern and query row on a run prompt (live; served from the q/k cache once warm)."""
    head = head or {"layer": 0, "head": 0}
    v = {
        f"{ids.RUN_SELECT}.value": run,
        f"{ids.HEAD_RESULT}.value": result,
        f"{ids.COMPARE_SELECT}.value": None,
        f"{ids.SELECTED_HEAD}.data": head,
        f"{ids.PROMPT_SELECT}.value": prompt,
        f"{ids.RUN_PROMPT}.n_clicks": 0,
        f"{ids.WINDOW_START}.value": 0,
        f"{ids.PATTERN_MODE}.value": "pattern",
    }
    bodies = {
        "runs": callback_body(deps, f"{ids.RUN_INFO}.children", v, [f"{ids.RUN_SELECT}.value"]),
        "head_map": callback_body(deps, f"{ids.HEAD_MAP}.figure", v, [f"{ids.HEAD_RESULT}.value"]),
    }
    if compare is not None:
        bodies["head_map_difference"] = callback_body(
            deps,
            f"{ids.HEAD_MAP}.figure",
            {**v, f"{ids.COMPARE_SELECT}.value": compare},
            [f"{ids.COMPARE_SELECT}.value"],
        )
    if prompt is not None:
        bodies["pattern"] = callback_body(deps, f"{ids.PATTERN}.figure", v, [f"{ids.SELECTED_HEAD}.data"])
        bodies["query_row"] = callback_body(
            deps, f"{ids.PATTERN}.figure", {**v, f"{ids.PATTERN_MODE}.value": "row"}, [f"{ids.PATTERN_MODE}.value"]
        )
    return bodies


def callback_response(base_url: str, body: dict, timeout: float = 30.0) -> dict:
    """The JSON ``response`` of one callback post (``{component id: {property: value}}``), to check what a
    callback answered (e.g. an empty status line) before loading it."""
    status, payload = _request(base_url.rstrip("/") + "/" + UPDATE, body, timeout)
    return json.loads(payload).get("response", {})


def view_bodies(
    deps: list[dict],
    run: str,
    *,
    head: dict | None = None,
    intervention: dict | None = None,
    ablation: dict | None = None,
    vision_run: str | None = None,
    vision_image: str = "0",
) -> dict[str, dict]:
    """Callbacks of the live views a visitor presses buttons in (each runs the model, one at a time):

    - ``intervention`` (``{"method", "params", "prompt", "answer"}``): the method's info line
      (``intervention_info``: build + fit without data) and "run intervention" (``intervention``: the prompt
      without and with the method, both outputs and the attention difference of ``head``);
    - ``ablation`` (``{"source", "k", "metric", "seeds", "result"}``): "run ablation" on ``run``;
    - ``vision_run``: the vision view's overlay of the run image ``vision_image`` for ``head`` (a VLM run).
    """
    head = head or {"layer": 0, "head": 0}
    bodies: dict[str, dict] = {}
    if intervention is not None:
        v = {
            f"{ids.RUN_SELECT}.value": run,
            f"{ids.SELECTED_HEAD}.data": head,
            f"{ids.IV_METHOD}.value": intervention["method"],
            f"{ids.IV_PARAMS}.value": intervention.get("params", ""),
            f"{ids.IV_PROMPT}.value": intervention["prompt"],
            f"{ids.IV_ANSWER}.value": intervention.get("answer", ""),
            f"{ids.IV_RUN}.n_clicks": 1,
        }
        bodies["intervention_info"] = callback_body(deps, f"{ids.IV_INFO}.children", v, [f"{ids.IV_METHOD}.value"])
        bodies["intervention"] = callback_body(deps, f"{ids.IV_FIGURE}.figure", v, [f"{ids.IV_RUN}.n_clicks"])
    if ablation is not None:
        v = {
            f"{ids.RUN_SELECT}.value": run,
            f"{ids.SELECTED_HEAD}.data": head,
            f"{ids.HEAD_RESULT}.value": ablation.get("result"),
            f"{ids.ABL_SOURCE}.value": ablation.get("source", "selected"),
            f"{ids.ABL_K}.value": ablation.get("k", 1),
            f"{ids.ABL_METRIC}.value": ablation.get("metric", "logprob"),
            f"{ids.ABL_SEEDS}.value": ablation.get("seeds", 1),
            f"{ids.ABL_RUN}.n_clicks": 1,
        }
        bodies["ablation"] = callback_body(deps, f"{ids.ABL_FIGURE}.figure", v, [f"{ids.ABL_RUN}.n_clicks"])
    if vision_run is not None:
        v = {
            f"{ids.RUN_SELECT}.value": vision_run,
            f"{ids.SELECTED_HEAD}.data": head,
            f"{ids.VISION_SOURCE}.value": vision_image,
            f"{ids.VISION_UPLOAD}.contents": None,
            f"{ids.VISION_QUESTION}.value": None,
        }
        bodies["vision"] = callback_body(deps, f"{ids.VISION_FIGURE}.figure", v, [f"{ids.VISION_SOURCE}.value"])
    return bodies


class ServedApp:
    """A Flask/Dash server on a free 127.0.0.1 port in a daemon thread (``with ServedApp(app.server) as s: s.url``).

    Server-side exceptions (Flask's ``got_request_exception``) are collected in ``exceptions``."""

    def __init__(self, flask_app, host: str = "127.0.0.1"):
        self.flask_app, self.host = flask_app, host
        self.exceptions: list[str] = []

    def _record(self, sender, exception, **extra) -> None:
        self.exceptions.append(f"{type(exception).__name__}: {exception}")

    def __enter__(self) -> ServedApp:

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        got_request_exception.connect(self._record, self.flask_app)
        self.server = make_server(self.host, 0, self.flask_app, threaded=True)
        self.url = f"http://{self.host}:{self.server.server_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.thread.join(10)
        got_request_exception.disconnect(self._record, self.flask_app)
