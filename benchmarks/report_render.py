"""`python -m benchmarks report-render [--report new.html] [old.html ...]`: how long headless Chromium takes to
render every view of the demo report (the main job of `make demo`: the embedded model, the demo
chat prompt, 64 new tokens), against the 5 s target.

It builds the demo report with this checkout (or times `--report`'s file instead). Other paths are
timed alongside,
e.g. a report written by an older mechvis, so the ratio new / old comes from one run on the same
(shared, variably loaded) machine.

"Rendered" means: every `.circuitsvis-view` has child elements and text (React committed the
component), every <canvas> inside a view has been drawn at a non-zero size, every figure <img>
is decoded, and one more frame was painted after that. Times are from navigation start
(`performance.now()` in the page). Three ways to reach every view are timed:

- first screen: the views (and figures) inside the first 1280 × 1000 viewport, no scrolling;
- scrolled: the page is scrolled to each view in turn, as a reader would, until every view rendered;
- render-all: `mechvisReport.renderAll()` right after load (the printing / test path).

A report without lazy views (older mechvis) renders everything on load: the three coincide, and
it is timed once per round.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 3
TARGET_S = 5.0
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--proxy-server=127.0.0.1:9"]

# Resolves with performance.now() once every view matched by `selector` is rendered (see module doc).
WAIT_RENDERED = """
(selector) => new Promise(resolve => {
  const views = Array.from(document.querySelectorAll(selector));
  // Cheap test first: innerText forces a layout, which would slow the page it measures if polled.
  const populated = () => views.every(v => v.childElementCount > 0);
  const drawn = () => views.every(v => v.innerText.length > 0
      && Array.from(v.querySelectorAll('canvas')).every(c => c.width > 0 && c.height > 0))
    && Array.from(document.images).every(i => i.complete);
  function check() {
    if (populated() && drawn()) requestAnimationFrame(() => requestAnimationFrame(() => resolve(performance.now())));
    else setTimeout(check, 25);
  }
  check();
})
"""

IN_FIRST_SCREEN = """
() => Array.from(document.querySelectorAll('.circuitsvis-view'))
  .filter(v => v.getBoundingClientRect().top < window.innerHeight).map(v => '#' + v.id).join(',')
"""

SCROLL_THROUGH = """
async () => {
  const ids = Array.from(document.querySelectorAll('.circuitsvis-view')).map(v => v.id);
  for (const id of ids) {
    document.getElementById(id).scrollIntoView({block: 'center'});
    await new Promise(resolve => {
      (function check() {
        const v = document.getElementById(id);
        if (v.childElementCount > 0 && v.innerText.length > 0) resolve(); else setTimeout(check, 25);
      })();
    });
  }
}
"""


def _note(text: str) -> None:
    print(f"[report-render] {text}", file=sys.stderr, flush=True)


def build_demo_report(directory: Path) -> Path:
    """The demo report, as `mechvis demo` writes it (default settings)."""
    from mechvis.demo import DEMO_PROMPT
    from mechvis.models import load_model
    from mechvis.report import write_report

    path = directory / "demo.html"
    write_report(load_model(), DEMO_PROMPT, path, chat=True, max_new_tokens=64, overwrite=True)
    return path


def time_report(browser, path: Path, mode: str) -> float:
    """Seconds from navigation start until every view rendered, reached by `mode` (first-screen,
    scrolled or render-all)."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.goto(path.as_uri(), wait_until="load", timeout=600_000)
    lazy = page.evaluate("typeof window.mechvisReport === 'object'")
    if mode == "first-screen":
        selector = page.evaluate(IN_FIRST_SCREEN) or ":not(*)"  # no view in the first screen: its figures
    else:
        selector = ".circuitsvis-view"
        if lazy and mode == "render-all":
            page.evaluate("window.mechvisReport.renderAll()")
        elif lazy and mode == "scrolled":
            page.evaluate(SCROLL_THROUGH)
    finished = page.evaluate(WAIT_RENDERED, selector)
    page.close()
    if problems:
        raise RuntimeError(f"{path.name}: errors in the page: {problems[:3]}")
    return finished / 1000


def main(paths: list[str] | None = None) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        sys.exit("report-render needs Chromium (/usr/bin/chromium; `make test` installs Debian's package).")
    paths = list(paths or [])
    given = None
    if "--report" in paths:
        at = paths.index("--report")
        given = Path(paths[at + 1]).resolve()
        del paths[at : at + 2]
    with tempfile.TemporaryDirectory() as directory:
        if given is None:
            _note("building the demo report with this checkout")
        reports = [("this checkout", given or build_demo_report(Path(directory)))]
        reports += [(Path(p).name, Path(p).resolve()) for p in paths]
        modes = ("first-screen", "scrolled", "render-all")
        results: dict[tuple[str, str], list[float]] = {}
        with sync_playwright() as session:
            browser = session.chromium.launch(executable_path=chromium, args=ARGS)
            for repeat in range(REPEATS):  # interleaved, so load changes hit every report alike
                for label, path in reports:
                    for mode in modes if label == "this checkout" else ("render-all",):
                        seconds = time_report(browser, path, mode)
                        results.setdefault((label, mode), []).append(seconds)
                        _note(f"round {repeat + 1}: {label}, {mode}: {seconds:.2f} s")
            browser.close()
        sizes = {label: path.stat().st_size for label, path in reports}
    print(f"\n## Report render in headless Chromium ({REPEATS} rounds; target ≤ {TARGET_S:.0f} s for every view)\n")
    print("| report | size | first screen | every view, scrolled | every view, renderAll() |\n|---|---|---|---|---|")
    for label, _ in reports:
        cells = [f"{min(results[label, m]):.2f}–{max(results[label, m]):.2f} s" if (label, m) in results else "(as render-all)" for m in modes]
        print(f"| {label} | {sizes[label] / 2**20:.1f} MB | " + " | ".join(cells) + " |")
    for label, _ in reports[1:]:
        for mode in ("scrolled", "render-all"):
            new, old = statistics.median(results[reports[0][0], mode]), statistics.median(results[label, "render-all"])
            print(f"\n{label} / this checkout, every view ({mode}), medians: {old:.2f} s / {new:.2f} s = {old / new:.1f}×")
    worst = max(max(results[reports[0][0], m]) for m in ("scrolled", "render-all"))
    print(f"\nthis checkout, slowest round to every view: {worst:.2f} s ({'meets' if worst <= TARGET_S else 'misses'} ≤ {TARGET_S:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
