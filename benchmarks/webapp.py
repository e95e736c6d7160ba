"""`mechvis serve` on the embedded model at N ≈ 512 tokens, each number against the target in
WEBAPP.md and, for decoding, against `mechvis.generate` in the same run (streaming ≤ 1.1× of it):
start → URL, time to first token (64-token prompt), tokens/s streamed without and with the
monitor, analysis-ready time after the last token, payload sizes (one attention layer raw and
gzipped, the largest token event), server memory per run, and in Chromium (when installed)
first paint, tab switch and the 512² heatmap draw."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import threading
import time

import httpx

import mechvis
from mechvis.demo import DEMO_PROMPT

TOKEN = "benchmark-token-0123456789"
N_NEW = 440  # the looping demo chat: ~70 prompt tokens + 440 ≈ 510
REPEATS = 2


def _server(model):
    import uvicorn

    from mechvis.serve import create_app

    started = time.perf_counter()
    app = create_app(model, model_name="embedded", token=TOKEN)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    return app, server, thread, url, time.perf_counter() - started


def _stream(url: str, body: dict) -> dict:
    """POST /api/generate; the arrival time of every event."""
    times: dict = {"tokens": [], "events": []}
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/api/generate", json=body, headers={"X-Mechvis-Token": TOKEN}, timeout=600) as response:
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                now = time.perf_counter() - started
                if kind == "token":
                    times["tokens"].append(now)
                    times["largest_event"] = max(times.get("largest_event", 0), len(line) - 6)
                elif kind in ("stopped", "analysis"):
                    times[kind] = now
                    times[f"{kind}_data"] = json.loads(line[6:])
                elif kind == "error":
                    raise RuntimeError(line)
    return times


def _row(name: str, value: str, target: str) -> None:
    print(f"| {name} | {value} | {target} |", flush=True)


def _note(text: str) -> None:
    print(f"[webapp] {text}", file=sys.stderr, flush=True)


def main() -> None:
    model = mechvis.load_model(device="cpu")
    started = time.perf_counter()
    mechvis.load_model(device="cpu")
    load_cached = time.perf_counter() - started
    app, server, thread, url, boot = _server(model)
    words = "The history of the printing press begins in Mainz, where Gutenberg combined movable metal type with oil ink and a press."
    prompt64 = " ".join((words + " ") * 4).split()[:52]
    prompt64 = " ".join(prompt64)
    n64 = len(mechvis.encode(model, prompt64).token_ids)
    mechvis.generate(model, prompt64, max_new_tokens=4)  # warm-up
    first = _stream(url, {"prompt": prompt64, "max_new_tokens": 8})
    first = _stream(url, {"prompt": prompt64, "max_new_tokens": 8})

    _note(f"time to first token: {first['tokens'][0] * 1000:.0f} ms; streaming {N_NEW} tokens")
    long_body = {"mode": "chat", "prompt": DEMO_PROMPT, "max_new_tokens": N_NEW}
    plain = _stream(url, long_body)
    run_id = plain["analysis_data"]["run"]
    run = httpx.get(f"{url}/api/runs/{run_id}").json()
    n_tokens = len(run["tokens"])
    n_generated = len(plain["tokens"])
    streamed_rate = (n_generated - 1) / (plain["tokens"][-1] - plain["tokens"][0])
    _note(f"streamed {n_generated} tokens at {streamed_rate:.1f}/s; mechvis.generate for comparison")
    # The ratios to `mechvis.generate` compare the best of REPEATS interleaved runs of each: on this
    # shared machine one run of either swings by ±15% (one monitor ratio read 1.13× from single runs).
    plain_totals, generate_totals, streamed_rates = [plain["stopped"]], [], [streamed_rate]
    for repeat in range(REPEATS):
        if repeat:
            again = _stream(url, long_body)
            plain_totals.append(again["stopped"])
            streamed_rates.append((len(again["tokens"]) - 1) / (again["tokens"][-1] - again["tokens"][0]))
        t0 = time.perf_counter()
        reference = mechvis.generate(model, DEMO_PROMPT, chat=True, max_new_tokens=N_NEW)
        generate_totals.append(time.perf_counter() - t0)
    # The monitor samples, and most seeds end the chat (EOS) long before N_NEW tokens: the rate is
    # measured on the first seed that runs to at least 80% of N_NEW (the longest of 8 otherwise),
    # so that it is the rate at N ≈ 512 and not at a short prefix.
    monitored, monitor_seed = None, 0
    for seed in range(8):
        _note(f"streaming with the monitor, seed {seed}")
        attempt = _stream(url, {**long_body, "schedule": "monitor", "seed": seed})
        if monitored is None or len(attempt["tokens"]) > len(monitored["tokens"]):
            monitored, monitor_seed = attempt, seed
        if len(attempt["tokens"]) >= 0.8 * N_NEW:
            break
    monitor_rate = (len(monitored["tokens"]) - 1) / (monitored["tokens"][-1] - monitored["tokens"][0])
    _note("mechvis.generate with the monitor, same seed")
    monitor_totals, generate_monitor_totals = [monitored["stopped"]], []
    for repeat in range(REPEATS):
        if repeat:
            monitor_totals.append(_stream(url, {**long_body, "schedule": "monitor", "seed": monitor_seed})["stopped"])
        t0 = time.perf_counter()
        mechvis.generate(model, DEMO_PROMPT, chat=True, max_new_tokens=N_NEW,
                         sampling=mechvis.SamplingSettings(seed=monitor_seed, schedule=mechvis.generation.MonitorTemperature()))
        generate_monitor_totals.append(time.perf_counter() - t0)

    layer = httpx.get(f"{url}/api/runs/{run_id}/attention/15")
    raw, zipped = len(layer.content), len(gzip.compress(layer.content, 6))
    stored = app.state.mechvis.store.get(run_id)

    print(f"\n## mechvis serve, embedded model, N = {n_tokens} tokens ({n_generated} generated)\n")
    print("| measure | result | target |\n|---|---|---|")
    _row("start → URL (model cached: load + app + bind)", f"{load_cached + boot:.2f} s", "≤ 3 s")
    _row(f"time to first token, {n64}-token prompt", f"{first['tokens'][0] * 1000:.0f} ms", "≤ 300 ms")
    _row(f"tokens/s streamed, no hooks ({REPEATS} runs)", "/".join(f"{rate:.1f}" for rate in streamed_rates), "≥ 25")
    _row(f"tokens/s streamed, with the monitor ({len(monitored['tokens'])} tokens, seed {monitor_seed})",
         f"{monitor_rate:.1f}", "≥ 12")
    def ratio(streamed: list[float], generated: list[float]) -> str:
        shown = lambda values: "/".join(f"{value:.2f}" for value in values)  # noqa: E731
        return f"{shown(streamed)} s vs {shown(generated)} s, best {min(streamed) / min(generated):.2f}×"

    _row(f"whole streamed request vs `mechvis.generate` (same settings, {REPEATS} interleaved runs each)",
         ratio(plain_totals, generate_totals), "≤ 1.1×")
    _row("the same with the monitor", ratio(monitor_totals, generate_monitor_totals), "≤ 1.1×")
    _row("analysis ready after the last token", f"{(plain['analysis'] - plain['tokens'][-1]):.2f} s", "≤ 5 s")
    _row("one attention layer (9 heads, uint8)", f"{raw / 2**20:.2f} MB, {zipped / 2**20:.2f} MB gzipped", "~1.2 MB, ~0.2 MB")
    _row("largest token event", f"{plain['largest_event']} B", "≤ ~2 KB")
    _row("server memory per run (store accounting)", f"{stored.nbytes / 2**20:.0f} MB", "≤ 512 MB")
    assert [t["id"] for t in run["tokens"]][run["prompt_length"]:] == reference.generated_ids

    chromium = shutil.which("chromium")
    if chromium:
        _browser(chromium, url, run_id, n_tokens)
    # uvicorn's shutdown waits for the requests still being computed (a tab's analysis runs in a
    # worker thread even after the browser has gone). Joining it fully is what lets the process
    # exit cleanly: a daemon thread still inside torch when the interpreter finalises is ended by
    # pthread_exit, whose unwinding through torch's C++ frames calls std::terminate (exit 134).
    server.should_exit = True
    thread.join()


def _browser(chromium: str, url: str, run_id: str, n_tokens: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as session:
        browser = session.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--proxy-server=127.0.0.1:9"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.goto(f"{url}/#run={run_id}&tab=attention&layer=15&pos={min(300, n_tokens - 1)}", wait_until="load")
        paint = page.evaluate("performance.getEntriesByType('paint').map(e => [e.name, e.startTime])")

        def ready(tab: str) -> None:
            deadline = time.time() + 120
            while page.evaluate(f"document.getElementById('tab-body').dataset.ready !== '{tab}'"):
                if time.time() > deadline:
                    raise TimeoutError(tab)
                time.sleep(0.005)

        ready("attention")
        draws = []
        for head in ("mean", "0", "1", "2"):
            page.select_option("#tab-body select >> nth=1", head)
            time.sleep(0.1)
            ready("attention")
            draws.append(float(page.get_attribute("#attention-canvas", "data-draw-ms")))

        def switch(tab: str) -> float:
            start = time.perf_counter()
            page.click(f"#tabs button[data-tab='{tab}']")
            ready(tab)
            return (time.perf_counter() - start) * 1000

        switch("entropy-curve")
        cached = min(switch("attention"), switch("confidence"))
        start = time.perf_counter()
        page.click("#tabs button[data-tab='attention']")
        ready("attention")
        page.keyboard.press("]")  # a layer not fetched yet
        time.sleep(0.05)
        ready("attention")
        fetched = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        page.click(f"#transcript .tok[data-pos='{min(200, n_tokens - 2)}']")
        page.wait_for_selector("#inspector-distribution")
        click = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        page.wait_for_selector("#inspector-lens", timeout=300_000)  # the logit lens of every position, computed once per run
        lens_ready = (time.perf_counter() - start) * 1000 + click
        heap = page.evaluate("performance.memory ? performance.memory.usedJSHeapSize : 0")
        browser.close()
    first_paint = dict(paint).get("first-contentful-paint", float("nan"))
    _row("first contentful paint (run restored from the link)", f"{first_paint:.0f} ms", "≤ 300 ms")
    _row("512² heatmap draw (canvas, per head / mean)", f"{min(draws):.1f}–{max(draws):.1f} ms", "≤ 16 ms")
    _row("tab switch, cached", f"{cached:.0f} ms", "≤ 150 ms")
    _row("tab switch + layer fetched", f"{fetched:.0f} ms", "≤ 500 ms")
    _row("token click → inspector", f"{click:.0f} ms", "≤ 100 ms")
    _row("token click → inspector's logit-lens rows (first click of a run)", f"{lens_ready:.0f} ms", "—")
    _row("browser JS heap", f"{heap / 2**20:.0f} MB", "≤ 300 MB")


if __name__ == "__main__":
    main()
