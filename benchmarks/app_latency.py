"""App latency: time from a click on the head map to the updated attention pattern, for a long prompt.

Goal (issue #6): under half a second for a 2,000-token prompt. Measured two ways:
- server: the callbacks a click runs (select head, head pattern from the cached q/k, figure) plus the JSON
  serialisation dash does, as plain function calls;
- browser (when Debian's chromium + chromium-driver and selenium are installed): a real click in headless Chromium
  until the pattern's title names the clicked head (network, serialisation, plotly drawing included), timed on the
  page's own clock from the mousedown to the title's change; the webdriver wall time (with its polling round trips)
  is reported beside it. Figures before 2026-12-04 (session 7) timed selenium's default 250 ms pointer travel too.
The first pattern of a new prompt costs one forward pass (reported separately); later clicks reuse its q/k.

organism-lm has a context of 1,024 tokens; for longer --tokens the benchmark raises the model's n_ctx for this
process only (RoPE positions past training: the numbers are timings, not meaningful attention).

    python benchmarks/app_latency.py [--model organism-lm] [--tokens 2000] [--clicks 10] [--no-browser]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import plotly.io as pio
import torch

import attnlab
from attnlab.apps import ids
from attnlab.apps.app import create_app
from attnlab.apps.callbacks import headmap, pattern, runs
from attnlab.apps.live import LiveModels
from attnlab.datasets import DATASETS
from attnlab.datasets.prose import prose_paragraphs


def long_prompt(model, n_tokens: int) -> str:
    """Prose paragraphs joined and cut to ``n_tokens`` tokens (special tokens included), decoded back to text."""
    paras = prose_paragraphs()
    text, i = "", 0
    while len(model.tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += paras[i % len(paras)] + "\n\n"
        i += 1
    n_special = len(model.token_ids("a")) - len(model.tokenizer("a", add_special_tokens=False)["input_ids"])
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: n_tokens - n_special]
    return model.tokenizer.decode(ids)


def clicks(model, k: int) -> list[tuple[int, int]]:
    g = torch.Generator().manual_seed(0)
    return [
        (int(torch.randint(model.n_layers, (1,), generator=g)), int(torch.randint(model.n_heads, (1,), generator=g)))
        for _ in range(k)
    ]


def server_latency(state, run_name: str, result: str, prompt: str, heads) -> dict:
    t0 = time.perf_counter()
    fig, msg = pattern.pattern_figure(run_name, {"layer": 0, "head": 0}, runs.TYPED, prompt, 0, None, state)
    first = time.perf_counter() - t0
    if msg:
        raise SystemExit(f"pattern failed: {msg}")
    times = []
    current = {"layer": 0, "head": 0}
    for layer, head in heads:
        t0 = time.perf_counter()
        click = {"points": [{"x": f"H{head}", "y": f"L{layer}"}]}
        current = headmap.select_head(ids.HEAD_MAP, click, run_name, result, current, state)
        fig, msg = pattern.pattern_figure(run_name, current, runs.TYPED, prompt, 0, None, state)
        pio.to_json(fig)  # what dash sends
        times.append(time.perf_counter() - t0)
        assert fig.layout.meta["head_label"] == f"L{layer}H{head}"
    return {
        "first_pattern_s": round(first, 3),
        "click_median_s": round(statistics.median(times), 4),
        "click_max_s": round(max(times), 4),
        "n_tokens": fig.layout.meta["n_tokens"],
    }


def browser_latency(app, model, prompt: str, heads) -> dict | None:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    profile = tempfile.mkdtemp(prefix="attnlab-bench-")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1300,2600",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(flag)
    d = webdriver.Chrome(options=opts, service=Service(shutil.which("chromedriver")))
    # textContent: the pattern is drawn in the Pattern tab while the click happens on the Heads tab's map
    title = lambda: d.find_element("css selector", f"#{ids.PATTERN} .gtitle").get_attribute("textContent")

    def wait(pred, timeout=120):
        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            try:
                if pred():
                    return
            except Exception:
                pass
            time.sleep(0.005)
        raise TimeoutError("page did not update")

    try:
        d.get(f"http://127.0.0.1:{server.server_port}/?tab=pattern")
        wait(lambda: title().startswith("L"))
        d.find_element("id", ids.PROMPT_SELECT).click()
        next(o for o in d.find_elements("css selector", "[role=option]") if o.text == "typed prompt").click()
        box = d.find_element("id", ids.CUSTOM_PROMPT)
        d.execute_script("arguments[0].scrollIntoView(true);", box)
        box.send_keys(prompt)
        d.find_element("id", ids.RUN_PROMPT).click()
        n = len(model.token_ids(prompt))
        wait(lambda: f"({n} tokens" in title())
        d.find_element("id", "tab-heads").click()
        time.sleep(0.5)
        drag = d.find_element("css selector", f"#{ids.HEAD_MAP} .nsewdrag")
        d.execute_script("arguments[0].scrollIntoView(true);", drag)
        w, h = drag.size["width"], drag.size["height"]
        # In-page clock: the page stamps the pointer's mousedown and, through a MutationObserver on the pattern view,
        # the moment its title first names the clicked head -- the latency a user sees, free of webdriver round trips.
        # The pointer moves with duration 0: selenium's default (250 ms of simulated travel) is not the app's time.
        d.execute_script(
            """
            const view = arguments[0];
            window.__bench = {down: null, done: null, want: null};
            document.addEventListener('mousedown', () => { window.__bench.down = performance.now(); }, true);
            new MutationObserver(() => {
              const b = window.__bench, t = document.querySelector('#' + view + ' .gtitle');
              if (b.want && !b.done && t && t.textContent.startsWith(b.want)) b.done = performance.now();
            }).observe(document.getElementById(view), {subtree: true, childList: true, characterData: true});
            """,
            ids.PATTERN,
        )
        times, page = [], []
        last = None
        for layer, head in heads:
            if (layer, head) == last:
                continue
            dx = (head + 0.5) / model.n_heads * w - w / 2
            dy = (layer + 0.5) / model.n_layers * h - h / 2
            d.execute_script("window.__bench = {down: null, done: null, want: arguments[0]};", f"L{layer}H{head} ")
            t0 = time.perf_counter()
            ActionChains(d, duration=0).move_to_element_with_offset(drag, int(dx), int(dy)).click().perform()
            wait(
                lambda layer=layer, head=head: title().startswith(f"L{layer}H{head} ") and f"({n} tokens" in title(), 30
            )
            times.append(time.perf_counter() - t0)
            wait(lambda: d.execute_script("return window.__bench.done !== null;"), 5)
            down, done = d.execute_script("return [window.__bench.down, window.__bench.done];")
            page.append((done - down) / 1000)
            last = (layer, head)
        return {
            "click_to_pattern_median_s": round(statistics.median(page), 4),
            "click_to_pattern_max_s": round(max(page), 4),
            "webdriver_wall_median_s": round(statistics.median(times), 4),
            "webdriver_wall_max_s": round(max(times), 4),
            "clicks": len(times),
        }
    finally:
        d.quit()
        server.shutdown()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism-lm")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-browser", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = attnlab.load(args.model)
    note = ""
    if args.tokens > model.n_ctx:
        note = f"n_ctx raised from {model.n_ctx} to {args.tokens + 64} for timing only"
        model.n_ctx = args.tokens + 64
    root = Path(tempfile.mkdtemp(prefix="attnlab-app-bench-"))
    attnlab.scan(model, "first_token_sink", DATASETS["prose"](model, 2, 0), out=root / "bench", progress=False)
    live = LiveModels()
    live.preload(args.model, model)
    app = create_app(root, live_model=live)
    prompt = long_prompt(model, args.tokens)
    heads = clicks(model, args.clicks)
    report = {
        "model": args.model,
        "tokens": len(model.token_ids(prompt)),
        "note": note,
        "server": server_latency(app.attnlab_state, "bench", "first_token_sink", prompt, heads),
        "browser": None if args.no_browser else browser_latency(app, model, prompt, heads),
        "machine": f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}",
    }
    print(json.dumps(report, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
