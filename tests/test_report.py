"""Reports: structure, escaping, the JSON schema, overwrite protection, figures and views; and in
headless Chromium with no network, that the report renders offline and runs nothing it shouldn't."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import mechvis
from mechvis.analysis import token_signals
from mechvis.cli import main
from mechvis.errors import InvalidArgumentError
from mechvis.report import SCHEMA, report_json, write_report
from mechvis.report.build import default_rollout_queries
from mechvis.viz import figures
from mechvis.viz.views import View, circuitsvis_bundle, colored_tokens_view, token_colour_values
from tests.reference import hf_attentions, rollout_loop

XSS_PROMPT = "Repeat <script>alert(1)</script> and </script><img src=x onerror=alert(2)> & count."
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _outside_bundle(document: str) -> str:
    bundle = circuitsvis_bundle()
    assert document.count(bundle) == 1
    return document.replace(bundle, "")


@pytest.fixture
def tiny_report(tiny, tmp_path):
    model, _ = tiny("llama")
    data = write_report(model, XSS_PROMPT, tmp_path / "report.html", json_path=tmp_path / "report.json",
                        max_new_tokens=10, layers=[0, 2])
    return model, data, (tmp_path / "report.html").read_text(encoding="utf-8"), json.loads((tmp_path / "report.json").read_text())


def test_report_inlines_the_bundle_once_and_loads_nothing_external(tiny_report):
    _, data, document, _ = tiny_report
    rest = _outside_bundle(document)
    assert re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", rest) is None
    assert "url(http" not in rest and "@import" not in rest
    n_views = rest.count('class="circuitsvis-view"')
    assert n_views == 4 + 1 + len(data.attention_layers)  # coloured tokens ×4, top-k, attention per layer
    assert rest.count("CircuitsVis.render(") == n_views
    for section in ("tokens", "lens", "attention", "rollout", "residual", "activations", "repetition"):
        assert f'<section id="{section}">' in rest


def test_token_strings_are_escaped_everywhere(tiny_report):
    _, _, document, _ = tiny_report
    rest = _outside_bundle(document)
    assert "<script>alert(1)" not in rest and "<img src=x" not in rest
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rest  # shown as text in the summary
    # Inside view props: no raw angle brackets at all, so no token can close the <script> element.
    for props in re.findall(r"CircuitsVis\.render\([^,]+, CircuitsVis\.\w+, (.*?)\);</script>", rest):
        assert "<" not in props and ">" not in props
        json.loads(props)
    assert rest.count("<script>") == 1 + rest.count("CircuitsVis.render(")  # the bundle + one per view


def test_json_schema(tiny_report):
    model, data, _, exported = tiny_report
    n = len(data.trace.run.tokens)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    assert exported["schema"] == SCHEMA
    assert set(exported) == {"schema", "notes", "model", "prompt", "chat", "sampling", "prompt_length", "generated_text", "tokens",
                             "token_signals", "logit_lens", "head_entropy", "rollout", "activation_norms",
                             "layer_similarity", "attention_layers", "direct_logit_attribution", "repetition", "ablation", "vision"}
    assert exported["notes"] == [] and exported["prompt"] == XSS_PROMPT and len(exported["tokens"]) == n
    assert set(exported["tokens"][0]) == {"position", "id", "text", "segment"}
    assert all(len(values) == n for values in exported["token_signals"].values())
    lens = exported["logit_lens"]
    assert len(lens["layers"]) == n_layers + 1 and np.array(lens["top1_probs"]).shape == (n_layers + 1, len(lens["positions"]))
    assert np.array(exported["head_entropy"]["mean_normalised"]).shape == (n_layers, n_heads)
    assert len(exported["head_entropy"]["classification"]) == n_layers * n_heads
    rolled = exported["rollout"]
    assert rolled["queries"] == list(range(exported["prompt_length"] - 1, n))  # last prompt token + generated
    assert np.array(rolled["rows"]).shape == (len(rolled["queries"]), n) and rolled["matrix"] is None  # no N × N by default
    assert np.array(exported["activation_norms"]["norms"]).shape == (n_layers, n)
    assert np.array(exported["layer_similarity"]["cosine"]).shape == (n_layers + 1, n_layers + 1)
    repetition = exported["repetition"]
    generated = n - exported["prompt_length"]
    assert len(repetition["labels"]) == generated and len(repetition["monitor_probability"]) == generated
    assert set(repetition["features"]) == set(mechvis.analysis.repetition.FEATURES)
    assert exported["token_signals"]["surprisal"][-1] is None  # NaN is written as null
    assert report_json(data)["generated_text"] == data.trace.generated_text


def test_rollout_rows_match_the_plain_loop_and_the_full_matrix_is_on_request(tiny, tmp_path):
    model, reference = tiny("llama")
    data = write_report(model, "One two three four", tmp_path / "r.html", json_path=tmp_path / "r.json", max_new_tokens=6,
                        layers=[0], rollout_queries=[-1, 2, 0], full_rollout=True)
    exported = json.loads((tmp_path / "r.json").read_text())
    n = len(data.trace.run.tokens)
    expected = rollout_loop(hf_attentions(reference, data.trace.run.tokens.tolist()), 0.5)  # numpy, from HF's attentions
    assert exported["rollout"]["queries"] == [n - 1, 2, 0]
    np.testing.assert_allclose(np.array(exported["rollout"]["rows"]), expected[[n - 1, 2, 0]], atol=1e-4)
    np.testing.assert_allclose(np.array(exported["rollout"]["matrix"]), expected, atol=1e-3)
    with pytest.raises(InvalidArgumentError, match="position"):
        write_report(model, "One two", tmp_path / "bad.html", max_new_tokens=2, rollout_queries=[99])
    with pytest.raises(InvalidArgumentError, match="at least 0"):
        write_report(model, "One two", tmp_path / "bad.html", max_new_tokens=2, rollout_queries=-1)


def test_default_rollout_queries():
    assert default_rollout_queries(5, 9) == [4, 5, 6, 7, 8]
    assert default_rollout_queries(5, 5) == [4]  # nothing generated: the last token
    assert default_rollout_queries(10, 74) == list(range(9, 74))  # the demo: 64 generated, all kept
    assert default_rollout_queries(10, 1010, cap=4) == [9, 10, 343, 676, 1009]  # evenly spaced, first and last kept
    assert default_rollout_queries(10, 1010, cap=0) == [9]
    with pytest.raises(InvalidArgumentError, match="at least 0"):
        default_rollout_queries(10, 20, cap=-1)


def test_existing_files_are_not_replaced_without_asking(tiny, tmp_path):
    model, _ = tiny("llama")
    existing = tmp_path / "report.html"
    existing.write_text("keep me")
    with pytest.raises(InvalidArgumentError, match="already exists"):
        write_report(model, "Hello", existing, max_new_tokens=2)
    assert existing.read_text() == "keep me"
    json_existing = tmp_path / "results.json"
    json_existing.write_text("{}")
    with pytest.raises(InvalidArgumentError, match="already exists"):
        write_report(model, "Hello", tmp_path / "new.html", json_path=json_existing, max_new_tokens=2)
    assert not (tmp_path / "new.html").exists()
    write_report(model, "Hello", existing, max_new_tokens=2, overwrite=True)
    assert existing.read_text().startswith("<!doctype html>")


def test_cli_report(tiny, tmp_path, tokenizer, capsys):
    from tests.tiny import tiny_hf_model

    model_dir = tmp_path / "model"
    tiny_hf_model("gpt2").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    output = tmp_path / "r.html"
    arguments = ["report", "--prompt", "Hi there", "--model", str(model_dir), "--max-new-tokens", "4", "-o", str(output),
                 "--json", str(tmp_path / "r.json"), "--layers", "1", "2"]
    assert main(arguments) == 0 and output.exists()
    assert json.loads((tmp_path / "r.json").read_text())["attention_layers"] == [1, 2]
    assert main(arguments) == 2 and "already exists" in capsys.readouterr().err
    assert main(arguments + ["--force"]) == 0
    assert main(["report", "--prompt", "Hi", "--model", str(model_dir), "--layers", "9", "-o", str(tmp_path / "x.html")]) == 2


def test_view_props_are_script_safe():
    view = View("ColoredTokens", {"tokens": ["</script><b>", "a&b", "\u2028"], "values": [float("nan"), 1.0, 2.0]}, "t")
    text = view.props_json()
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text) == {"tokens": ["</script><b>", "a&b", "\u2028"], "values": [None, 1.0, 2.0]}
    assert "</script" not in circuitsvis_bundle()


def test_colour_values_match_the_distributions(tiny):
    model, _ = tiny("llama")
    trace = mechvis.generate(model, "One two three", max_new_tokens=5, temperature=1.5, seed=3)
    run = trace.run
    signals = token_signals(run.logits, run.tokens)
    probabilities = token_colour_values(trace, signals, "probability")
    softmax = run.logits.double().softmax(-1)
    for position in range(1, len(run.tokens)):
        assert probabilities[position] == pytest.approx(softmax[position - 1, run.tokens[position]].item(), abs=1e-3)
    not_argmax = token_colour_values(trace, signals, "not_argmax")
    for step, position in enumerate(trace.generated_positions):
        assert not_argmax[position] == float(softmax[position - 1].argmax().item() != trace.generated_ids[step])
    assert colored_tokens_view(trace, signals, "entropy").props["tokens"] == run.str_tokens
    with pytest.raises(InvalidArgumentError, match="mode"):
        token_colour_values(trace, signals, "loudness")


def test_figures_draw_tokens_as_plain_text(tiny):
    model, _ = tiny("llama")
    result = mechvis.run(model, "Price: $5 and $x^2$ \\frac{a}{b} done")
    signals = token_signals(result.logits, result.tokens)
    figure = figures.token_entropy_curve(signals, result.str_tokens, sort=True)
    assert isinstance(figure, Figure)
    figure.savefig(io.BytesIO(), format="png")  # drawn (Agg): math-text parsing of '$x^2$' would raise or mangle here
    labels = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    assert any("$" in label for label in labels)
    assert figures.display_token("a\nb\tc") == "a↵b⇥c"
    assert figures.display_token("\r\x00\x7f") == "\\r\\x00\\x7f"  # no glyph is missing from the figure font


@pytest.mark.parametrize("backend", [None, "svg"])
def test_figures_leave_the_process_backend_and_pyplot_alone(backend):
    """Importing the modules that draw and drawing a figure (in a fresh process) neither switches
    matplotlib's backend (they once called `matplotlib.use("Agg")`) nor loads pyplot."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, io, matplotlib, torch\n"
        "before = matplotlib.get_backend()\n"
        "loaded = 'matplotlib.pyplot' in sys.modules\n"
        "import mechvis.viz.figures, mechvis.report.html, mechvis.sweep.summary, mechvis.studies.repetition_eval\n"
        "mechvis.viz.figures.image_mass_figure(torch.rand(4)).savefig(io.BytesIO(), format='png')\n"
        "print(before, matplotlib.get_backend(), loaded or 'matplotlib.pyplot' not in sys.modules)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}
    if backend is not None:
        env["MPLBACKEND"] = backend
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert shown[0] == shown[1] and shown[2] == "True", shown
    if backend is not None:
        assert shown[0] == backend


@pytest.mark.integration
def test_report_in_headless_chromium(embedded, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("Chromium is not installed; `make test` installs Debian's chromium package.")
    prompt = XSS_PROMPT + " Then list the days of the week, and the months of the year, each with a short note about it."
    path = tmp_path / "report.html"
    data = write_report(embedded, prompt, path, chat=True, max_new_tokens=150)
    n_tokens = len(data.trace.run.tokens)
    assert n_tokens >= 150
    size = path.stat().st_size
    assert size <= 15 * 1024 * 1024, f"{size / 2**20:.1f} MB for {n_tokens} tokens"
    ARTIFACTS.mkdir(exist_ok=True)
    requests, problems, dialogs = [], [], []
    with playwright.sync_playwright() as session:
        browser = session.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--proxy-server=127.0.0.1:9"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.on("request", lambda request: requests.append(request.url))
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(path.as_uri(), wait_until="load", timeout=300_000)  # generous: two slow cores
        # Views below the fold wait until they come near the viewport; a reader scrolls to each.
        last = page.locator(".circuitsvis-view").last
        assert last.get_attribute("data-rendered") is None and last.evaluate("e => e.childElementCount") == 0
        page.evaluate("""async () => {
            for (const view of document.querySelectorAll('.circuitsvis-view')) {
                view.scrollIntoView({block: 'center'});
                await new Promise(done => (function check() { view.childElementCount ? done() : setTimeout(check, 20); })());
            }
        }""")
        page.wait_for_function(
            "Array.from(document.querySelectorAll('.circuitsvis-view')).every(e => e.childElementCount > 0 && e.innerText.length > 0)",
            timeout=300_000,
        )
        page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=False)
        page.locator("#attention").screenshot(path=str(ARTIFACTS / "report-attention.png"))
        views = page.evaluate("document.querySelectorAll('.circuitsvis-view').length")
        # The head selector redraws a layer's view with one head.
        selector = page.locator("select.mechvis-head").first
        view_id = selector.get_attribute("data-view")
        selector.select_option("0")
        head_name = f"L{data.attention_layers[0]}H0"
        page.wait_for_function(f"document.getElementById('{view_id}').innerText.includes('{head_name}')", timeout=120_000)
        injected = page.evaluate("document.querySelectorAll('img[src=\"x\"]').length")
        summary = page.locator("header").inner_text()
        browser.close()
    assert [url for url in requests if not url.startswith(("file://", "data:"))] == []
    assert problems == [] and dialogs == [] and injected == 0
    assert views == 5 + len(data.attention_layers)
    assert "<script>alert(1)</script>" in summary and "<img src=x onerror=alert(2)>" in summary


@pytest.mark.integration
def test_demo_writes_the_report_and_prints_its_path(tmp_path, capsys):
    output = tmp_path / "out" / "demo.html"
    assert main(["demo", "--max-new-tokens", "40", "-o", str(output)]) == 0
    printed = capsys.readouterr().out
    assert f"Report: {output.resolve()}" in printed and "Generated text:" in printed
    document = output.read_text(encoding="utf-8")
    assert document.count(circuitsvis_bundle()) == 1 and "List the days of the week" in document


def test_emoji_and_cjk_tokens_draw_without_a_warning_per_glyph(tiny, tmp_path):
    """matplotlib's font has no emoji / CJK glyphs: the figures draw boxes, silently; the text is
    in the report's HTML (escaped) all the same."""
    import warnings

    model, _ = tiny("llama")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(model, "🎉東京 is a city", tmp_path / "report.html", max_new_tokens=4, layers=[0])
    assert not [warning for warning in caught if "missing from font" in str(warning.message)]
    assert "東京" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_the_progress_bar_is_closed_when_the_report_fails(tiny, monkeypatch):
    """An error during generation closes the stage bar first, so the message starts on its own line."""
    from tqdm.auto import tqdm

    import mechvis.report.build as build

    model, _ = tiny("llama")
    bars = []

    class Recorded(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    def failing(*args, **kwargs):
        assert not bars[0].disable  # the stage bar is open while generating
        raise InvalidArgumentError("generation failed")

    monkeypatch.setattr(build, "tqdm", Recorded)
    monkeypatch.setattr(build, "generate", failing)
    with pytest.raises(InvalidArgumentError, match="generation failed"):
        build.build_report_data(model, "Hello")
    assert len(bars) == 1 and bars[0].disable  # closed
