"""`mechvis sweep`: dataset validation, rows against independent computations, atomic shards,
resume after a real SIGKILL, fingerprints, summary statistics, the report and the example data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM

import mechvis
from mechvis.errors import DatasetError, InvalidArgumentError, SweepMismatchError
from mechvis.sweep import ANALYSES, read_dataset, read_sweep, run_sweep
from tests.tiny import tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random Llama saved with the embedded tokenizer, loadable by name in subprocesses."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_hf_model("llama").save_pretrained(directory)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    return mechvis.load_model(str(tiny_dir), device="cpu")


def write_jsonl(path: Path, items: list) -> Path:
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items))
    return path


def prompts(n: int, paired: bool = False) -> list[dict]:
    words = ["river", "mountain", "city", "garden", "harbour", "forest", "valley", "bridge"]
    items = []
    for i in range(n):
        item = {"id": f"q{i}", "prompt": f"The {words[i % 8]} number {i} was known for its"}
        if paired:
            item.update(condition="a" if i % 2 == 0 else "b", pair=f"p{i // 2}")
        items.append(item)
    return items


# --- validation -------------------------------------------------------------------------------

BAD = {
    "malformed JSON": ['{"id": "a", "prompt": "x"}', '{"id": "b", "prompt": "y"}', '{"id": "c", "prompt": '],
    "duplicate id": [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "a", "prompt": "z"}],
    "missing id": [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"prompt": "z"}],
    "missing image": [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "c", "prompt": "z", "image": "nope.png"}],
    "unknown field": [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "c", "prompt": "z", "promt": "z"}],
    "no prompt": [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "c"}],
    "bad generate": [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "c", "prompt": "z", "generate": {"max_new_tokens": "9"}}],
    "bad message": [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}, {"id": "c", "messages": [{"role": "user"}]}],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_datasets_fail_before_model_work_naming_the_line(case, tmp_path, no_model_work):
    dataset = write_jsonl(tmp_path / "data.jsonl", BAD[case])
    with pytest.raises(DatasetError, match=r"data\.jsonl, line 3"):
        run_sweep(dataset, tmp_path / "out", ["lens"])
    assert not (tmp_path / "out").exists()


def test_bad_output_and_worker_counts_fail_before_anything_is_written(tmp_path, no_model_work):
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "prompt": "x"}])
    (tmp_path / "existing.html").write_text("mine")
    for out in (tmp_path / "existing.html", tmp_path / "existing.html" / "sub"):
        with pytest.raises(InvalidArgumentError, match="existing.html is a file, not a directory"):
            run_sweep(dataset, out, ["lens"])
    assert (tmp_path / "existing.html").read_text() == "mine"
    for options in ({"workers": 0}, {"workers": -2}, {"threads_per_worker": 0}):
        with pytest.raises(InvalidArgumentError, match="must be at least 1"):
            run_sweep(dataset, tmp_path / "out", ["lens"], backend="ray", **options)
    assert not (tmp_path / "out").exists()


def test_bad_parquet_row_and_analysis_checks(tmp_path, no_model_work):
    table = pa.table({"id": ["a", "b", "a"], "prompt": ["x", "y", "z"]})
    pq.write_table(table, tmp_path / "data.parquet")
    with pytest.raises(DatasetError, match=r"row 3.*duplicate id 'a'"):
        read_dataset(tmp_path / "data.parquet")
    dataset = write_jsonl(tmp_path / "data.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}])
    with pytest.raises(InvalidArgumentError, match="Unknown analyses \\['lenz'\\]"):
        run_sweep(dataset, tmp_path / "out", ["lenz"])
    with pytest.raises(DatasetError, match="line/row 1 .*'repetition' analysis"):
        run_sweep(dataset, tmp_path / "out", ["repetition"])
    with pytest.raises(DatasetError, match="line/row 1 .*'ablation' analysis needs a one-token 'target'"):
        run_sweep(dataset, tmp_path / "out", ["ablation"])
    with pytest.raises(InvalidArgumentError, match="Unknown parameters \\['q'\\] of 'lens'"):
        run_sweep(dataset, tmp_path / "out", ["lens"], params={"lens": {"q": 1}})
    with pytest.raises(DatasetError, match="dataset is a .jsonl or .parquet"):
        read_dataset(write_jsonl(tmp_path / "data.json", [{"id": "a", "prompt": "x"}]))
    for analysis, key, value in (("lens", "k", 0), ("lens", "k", -1), ("lens", "k", 100_000), ("lens", "k", "abc"),
                                 ("lens", "include_resid_mid", 1), ("heads", "sink_positions", [-1]),
                                 ("ablation", "method", "noise"), ("ablation", "batch_size", 0)):
        with pytest.raises(InvalidArgumentError, match=f"Parameter {analysis}.{key} must be"):
            run_sweep(dataset, tmp_path / "out", [analysis], params={analysis: {key: value}})
    assert not (tmp_path / "out").exists()  # refused before any file was written


def test_parquet_and_jsonl_datasets_read_the_same(tmp_path):
    items = [{"id": "a", "prompt": "x", "condition": "c", "pair": "p"},
             {"id": 7, "messages": [{"role": "user", "content": "hi"}], "generate": {"max_new_tokens": 3, "seed": 1}},
             {"id": "c", "prompt": "z", "continuation": " w", "target": " w"}]
    from_json = read_dataset(write_jsonl(tmp_path / "d.jsonl", items))
    rows = items[:1] + [{**items[1], "id": "7"}] + items[2:]
    keys = list(dict.fromkeys(key for row in rows for key in row))
    pq.write_table(pa.Table.from_pylist([{key: row.get(key) for key in keys} for row in rows]), tmp_path / "d.parquet")
    from_parquet = read_dataset(tmp_path / "d.parquet")
    assert [item.canonical() for item in from_json] == [item.canonical() for item in from_parquet]
    assert from_json[1].chat and from_json[1].generate == {"max_new_tokens": 3, "seed": 1}


# --- rows against independent computations --------------------------------------------------

def test_rows_equal_the_analyses_and_a_plain_hf_forward(tiny_dir, tiny_model, tmp_path):
    items = prompts(5) + [{"id": "t", "prompt": "The cat sat on the", "target": " mat"},
                          {"id": "c", "prompt": "Water is", "continuation": " wet and cold"}]
    dataset = write_jsonl(tmp_path / "d.jsonl", items)
    run_sweep(dataset, tmp_path / "out", ["lens", "heads", "tokens"], model=str(tiny_dir), shard_size=3, progress=False)
    lens, heads, tokens = (read_sweep(tmp_path / "out", name).to_pandas() for name in ("lens", "heads", "tokens"))
    assert list(dict.fromkeys(lens["item_id"])) == [item["id"] for item in items]

    # 1. Known answer: each item's rows equal calling the analysis on that item directly (≤ 1e-6).
    from mechvis.analysis import head_entropy, logit_lens, token_signals

    model = tiny_model
    for item in items:
        if "continuation" in item:
            trace = mechvis.teacher_force(model, item["prompt"], item["continuation"])
            run, position, target = trace.run, trace.prompt_length - 1, trace.generated_ids[0]
        else:
            run = mechvis.run(model, item["prompt"])
            position, target = len(run.tokens) - 1, item.get("target")
        direct = logit_lens(run.cache, model, positions=[position], target=target, k=3)
        rows = lens[lens["item_id"] == item["id"]]
        np.testing.assert_allclose(np.stack(rows["top_probs"]), direct.top_probs[:, 0].numpy(), atol=1e-6)
        np.testing.assert_allclose(rows["target_prob"], direct.target_probs[:, 0].numpy(), atol=1e-6)
        np.testing.assert_allclose(rows["kl_from_final"], direct.kl_from_final[:, 0].numpy(), atol=1e-6)
        assert rows["target_rank"].tolist() == direct.target_ranks[:, 0].tolist()
        entropy = head_entropy(run.cache, model)
        np.testing.assert_allclose(heads[heads["item_id"] == item["id"]]["normalised_entropy"],
                                   entropy.mean_normalised.flatten().numpy(), atol=1e-6)
        signals = token_signals(run.logits, run.tokens)
        np.testing.assert_allclose(tokens[tokens["item_id"] == item["id"]]["entropy"], signals.entropy.numpy(), atol=1e-6)

    # 2. Independent: a plain HF forward (eager attention, fp32), the formulas written with numpy/scipy.
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()
    n_layers = reference.config.num_hidden_layers
    for item in items[:3] + items[5:6]:
        ids = model.hf_tokenizer(item["prompt"])["input_ids"]
        with torch.no_grad():
            out = reference(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
        # lens: layer i's residual through the final norm and the unembedding; last row = the model's logits.
        residuals = [reference.model.norm(h[0, -1]) for h in out.hidden_states[:n_layers]] + [None]
        logits = [reference.lm_head(r).double() for r in residuals[:-1]] + [out.logits[0, -1].double()]
        probs = np.stack([torch.softmax(l, -1).detach().numpy() for l in logits])
        rows = lens[lens["item_id"] == item["id"]]
        np.testing.assert_allclose(rows["top1_prob"], probs.max(-1), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(rows["entropy"], stats.entropy(probs, axis=-1), rtol=1e-4)
        final = probs[-1]
        np.testing.assert_allclose(rows["kl_from_final"], [stats.entropy(final, p) for p in probs], atol=1e-4)
        target = final.argmax() if "target" not in item else model.hf_tokenizer.encode(item["target"], add_special_tokens=False)[0]
        np.testing.assert_allclose(rows["target_prob"], probs[:, target], rtol=1e-4, atol=1e-8)
        # heads: each row's entropy / log(visible keys), averaged over queries 1..n-1; mass on key 0.
        attention = torch.stack(out.attentions)[:, 0].double().numpy()  # layer head query key
        n = attention.shape[-1]
        row_entropy = np.stack([stats.entropy(attention[..., q, : q + 1], axis=-1) for q in range(1, n)], -1)
        normalised = (row_entropy / np.log(np.arange(2, n + 1))).mean(-1)
        head_rows = heads[heads["item_id"] == item["id"]]
        np.testing.assert_allclose(head_rows["normalised_entropy"], normalised.reshape(-1), atol=1e-5)
        np.testing.assert_allclose(head_rows["sink_mass"], attention[..., 1:, 0].mean(-1).reshape(-1), atol=1e-5)
        # tokens: entropy of every position's softmax, surprisal of the next token.
        p = torch.softmax(out.logits[0].double(), -1).numpy()
        token_rows = tokens[tokens["item_id"] == item["id"]]
        np.testing.assert_allclose(token_rows["entropy"], stats.entropy(p, axis=-1), rtol=1e-4)
        np.testing.assert_allclose(token_rows["surprisal"][:-1], -np.log(p[np.arange(len(ids) - 1), ids[1:]]), rtol=1e-4)
        assert np.isnan(token_rows["surprisal"].iloc[-1])


def test_generation_repetition_and_ablation_rows(tiny_dir, tiny_model, tmp_path):
    from mechvis.generation.monitor import rep_labels
    from mechvis.interventions import ablation_sweep, target_probability

    items = [{"id": "g", "prompt": "one two three one two three", "generate": {"max_new_tokens": 6}},
             {"id": "h", "prompt": "The cat sat on the", "continuation": " mat and the cat sat on the mat"}]
    out = tmp_path / "out"
    run_sweep(write_jsonl(tmp_path / "d.jsonl", items), out, ["repetition", "tokens"], model=str(tiny_dir), progress=False)
    rows = read_sweep(out, "repetition").to_pandas()
    trace = mechvis.generate(tiny_model, items[0]["prompt"], max_new_tokens=6)
    generated = rows[rows["item_id"] == "g"]
    assert generated["token_id"].tolist() == trace.generated_ids
    assert generated["position"].tolist() == list(trace.generated_positions)
    assert generated["label"].tolist() == rep_labels(trace.generated_ids).tolist()
    assert ((generated["probability"] >= 0) & (generated["probability"] <= 1)).all()
    assert generated["alarm"].sum() <= 1
    # the token rows of a generating item cover prompt + generated tokens
    assert len(read_sweep(out, "tokens").to_pandas().query("item_id == 'g'")) == trace.prompt_length + len(trace.generated_ids)

    ablation_items = [{"id": "a", "prompt": "The cat sat on the", "target": " mat"}]
    run_sweep(write_jsonl(tmp_path / "a.jsonl", ablation_items), tmp_path / "ab", ["ablation"], model=str(tiny_dir), progress=False)
    table = read_sweep(tmp_path / "ab", "ablation").to_pandas()
    tokens = mechvis.encode(tiny_model, ablation_items[0]["prompt"]).token_ids
    direct = ablation_sweep(tiny_model, torch.tensor(tokens), target_probability(tiny_model, " mat"))
    np.testing.assert_allclose(table["effect"], direct.effect.flatten().numpy(), atol=1e-6)
    # independent: zeroing head (0, 1)'s z by hand through a HF pre-hook on o_proj
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation="eager").eval()
    head_dim = reference.config.hidden_size // reference.config.num_attention_heads

    def zero_head(module, args):
        z = args[0].clone()
        z[..., head_dim : 2 * head_dim] = 0
        return (z,)

    target = tiny_model.hf_tokenizer.encode(" mat", add_special_tokens=False)[0]
    with torch.no_grad():
        clean = reference(torch.tensor([tokens])).logits[0, -1].softmax(-1)[target].item()
        handle = reference.model.layers[0].self_attn.o_proj.register_forward_pre_hook(zero_head)
        ablated = reference(torch.tensor([tokens])).logits[0, -1].softmax(-1)[target].item()
        handle.remove()
    row = table[(table["layer"] == 0) & (table["head"] == 1)].iloc[0]
    assert row["baseline"] == pytest.approx(clean, rel=1e-4)
    assert row["effect"] == pytest.approx(ablated - clean, abs=1e-6)


# --- shards, atomicity, fingerprints, resume ---------------------------------------------------

def test_schemas_are_fixed_and_shards_hold_k_items(tiny_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "d.jsonl", prompts(7))
    result = run_sweep(dataset, tmp_path / "out", ["lens", "heads"], model=str(tiny_dir), shard_size=3, progress=False)
    assert result.n_shards == 3 and result.shards_run == [0, 1, 2]
    for name in ("lens", "heads"):
        parts = sorted((tmp_path / "out" / name).iterdir())
        assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
        assert [pq.read_table(p).column("item_id").unique().to_pylist() for p in parts] == [
            ["q0", "q1", "q2"], ["q3", "q4", "q5"], ["q6"]]
        assert pq.read_schema(parts[0]).remove_metadata().equals(ANALYSES[name].schema)
    assert len(read_sweep(tmp_path / "out", "heads")) == 7 * 3 * 4  # items × layers × heads


def test_a_failed_write_leaves_no_part_and_no_temp_file(tiny_dir, tmp_path, monkeypatch):
    import mechvis.sweep.shards as shards

    dataset = write_jsonl(tmp_path / "d.jsonl", prompts(4))
    calls, write = [], pq.write_table

    def crashing(table, handle):
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"PAR1 half a file")
            raise OSError("disk full")
        write(table, handle)

    monkeypatch.setattr(shards.pq, "write_table", crashing)
    with pytest.raises(OSError, match="disk full"):
        run_sweep(dataset, tmp_path / "out", ["lens"], model=str(tiny_dir), shard_size=2, progress=False, summary=False)
    files = sorted(p.name for p in (tmp_path / "out" / "lens").iterdir())
    assert files == ["part-00000.parquet"]  # shard 1's half-written temp file is gone


def test_a_killed_writers_temp_file_is_gone_when_the_sweep_ends(tiny_dir, tmp_path, monkeypatch):
    """A worker killed inside `atomic_write_bytes` (as Ray workers can be) leaves its temp file; Ray
    re-runs the shard elsewhere, and the finished sweep must not keep the orphan."""
    import mechvis.sweep.shards as runner

    dataset = write_jsonl(tmp_path / "d.jsonl", prompts(4))
    out = tmp_path / "out"
    write = runner.write_table

    def killed_once(table, path):
        orphan = path.parent / f".{path.name}.999999.deadbeef.tmp"
        if not orphan.exists() and "00001" in path.name:
            orphan.write_bytes(b"PAR1 half a file")  # what a SIGKILL mid-write leaves behind
        write(table, path)

    monkeypatch.setattr(runner, "write_table", killed_once)
    result = run_sweep(dataset, out, ["lens", "tokens"], model=str(tiny_dir), shard_size=2, progress=False, summary=False)
    assert result.shards_run == [0, 1]
    assert not list(out.rglob(".*.tmp"))
    assert sorted(p.name for p in (out / "lens").iterdir()) == ["part-00000.parquet", "part-00001.parquet"]


@pytest.mark.parametrize("content", ['{"a": 1}', "not json at all", '["analyses"]'])
def test_a_fingerprint_file_mechvis_did_not_write_is_never_replaced(content, tiny_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "d.jsonl", prompts(2))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "fingerprint.json").write_text(content)
    for overwrite in (False, True):
        with pytest.raises(SweepMismatchError, match="not a fingerprint mechvis wrote"):
            run_sweep(dataset, out, ["lens"], model=str(tiny_dir), shard_size=2, overwrite=overwrite, progress=False)
    assert (out / "fingerprint.json").read_text() == content and sorted(p.name for p in out.iterdir()) == ["fingerprint.json"]


def test_a_changed_sweep_refuses_to_mix_and_overwrite_starts_over(tiny_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "d.jsonl", prompts(3))
    out = tmp_path / "out"
    run_sweep(dataset, out, ["lens"], model=str(tiny_dir), progress=False)
    again = run_sweep(dataset, out, ["lens"], model=str(tiny_dir), progress=False)
    assert again.shards_run == [] and again.shards_skipped == 1
    with pytest.raises(SweepMismatchError, match="differs in analyses"):
        run_sweep(dataset, out, ["lens"], params={"lens": {"k": 4}}, model=str(tiny_dir), progress=False)
    with pytest.raises(SweepMismatchError, match="dataset_sha256"):
        run_sweep(write_jsonl(dataset, prompts(4)), out, ["lens"], model=str(tiny_dir), progress=False)
    with pytest.raises(SweepMismatchError, match="shard_size"):
        run_sweep(dataset, out, ["lens"], model=str(tiny_dir), shard_size=2, progress=False)
    fresh = run_sweep(dataset, out, ["lens"], model=str(tiny_dir), shard_size=2, overwrite=True, progress=False)
    # a sweep that failed before finishing a shard leaves only its fingerprint: a corrected one may start there
    failed = tmp_path / "failed"
    failed.mkdir()
    written = json.loads((out / "fingerprint.json").read_text())
    (failed / "fingerprint.json").write_text(json.dumps({**written, "analyses": "something else"}))
    assert run_sweep(dataset, failed, ["lens"], model=str(tiny_dir), progress=False).shards_run == [0]
    assert fresh.shards_run == [0, 1]
    assert read_sweep(out, "lens").column("item_id").unique().to_pylist() == ["q0", "q1", "q2", "q3"]
    fingerprint = json.loads((out / "fingerprint.json").read_text())
    assert set(fingerprint) >= {"mechvis_version", "analyses", "model", "weights_sha256", "dtype", "dataset_sha256"}
    # overwriting with other analyses leaves no empty folder of the old ones; a user's file there stays
    (out / "notes.txt").write_text("mine")
    switched = run_sweep(dataset, out, ["tokens"], model=str(tiny_dir), shard_size=2, overwrite=True, progress=False)
    assert switched.shards_run == [0, 1]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["tokens"]
    (out / "tokens" / "mine.txt").write_text("mine")
    run_sweep(dataset, out, ["lens"], model=str(tiny_dir), shard_size=2, overwrite=True, progress=False)
    assert sorted(p.name for p in (out / "tokens").iterdir()) == ["mine.txt"] and (out / "notes.txt").read_text() == "mine"


def _sweep_command(dataset, out, model):
    return [sys.executable, "-m", "mechvis.cli", "sweep", str(dataset), "-a", "lens", "tokens", "-o", str(out),
            "--model", str(model), "--shard-size", "2", "--threads-per-worker", "1"]


def test_resume_after_sigkill_yields_exactly_the_uninterrupted_rows(tiny_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "d.jsonl", prompts(40))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(_sweep_command(dataset, out, tiny_dir), env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while len(list((out / "tokens").glob("part-*.parquet"))) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    done = sum(1 for index in range(20) if all((out / a / f"part-{index:05d}.parquet").exists() for a in ("lens", "tokens")))
    assert 3 <= done < 20, f"the kill should land mid-sweep; {done} of 20 shards were complete"

    resumed = run_sweep(dataset, out, ["lens", "tokens"], model=str(tiny_dir), shard_size=2, threads_per_worker=1, progress=False)
    assert resumed.shards_skipped == done and len(resumed.shards_run) == 20 - done
    complete = run_sweep(dataset, tmp_path / "whole", ["lens", "tokens"], model=str(tiny_dir), shard_size=2,
                         threads_per_worker=1, progress=False)
    assert complete.shards_run == list(range(20))
    for name, keys in (("lens", ["item_id", "layer"]), ("tokens", ["item_id", "position"])):
        killed, whole = read_sweep(out, name), read_sweep(tmp_path / "whole", name)
        assert killed.equals(whole)
        assert not killed.to_pandas().duplicated(keys).any()
    assert not list(out.rglob(".*.tmp"))


# --- summary and report -----------------------------------------------------------------------

def test_summary_statistics_against_the_formulas(tiny_dir, tmp_path):
    dataset = write_jsonl(tmp_path / "d.jsonl", prompts(8, paired=True))
    run_sweep(dataset, tmp_path / "out", ["lens", "heads"], model=str(tiny_dir), progress=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    lens = read_sweep(tmp_path / "out", "lens").to_pandas()
    layer = 2
    rows = lens[lens["layer"] == layer]
    values = rows[rows["condition"] == "a"]["entropy"].to_numpy(float)
    mean = next(r for r in summary["lens"]["means"] if r["condition"] == "a" and r["layer"] == layer and r["metric"] == "entropy")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))  # t interval by hand
    assert mean["n"] == 4 and mean["mean"] == pytest.approx(values.mean())
    assert (mean["ci_low"], mean["ci_high"]) == pytest.approx((values.mean() - half, values.mean() + half))
    a = rows[rows["condition"] == "a"].set_index("pair")["entropy"].astype(float)
    b = rows[rows["condition"] == "b"].set_index("pair")["entropy"].astype(float).loc[a.index]
    d = (b - a).to_numpy()
    t = d.mean() / (d.std(ddof=1) / np.sqrt(len(d)))
    paired = next(r for r in summary["lens"]["paired"] if r["layer"] == layer and r["metric"] == "entropy")
    assert paired["n_pairs"] == 4 and paired["mean_difference"] == pytest.approx(d.mean())
    assert paired["ttest_rel_p"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    heads = read_sweep(tmp_path / "out", "heads").to_pandas()
    per_item = heads[heads["layer"] == 0].groupby("item_id")["sink_mass"].mean()
    sink = next(r for r in summary["heads"]["means"] if r["condition"] == "a" and r["layer"] == 0 and r["metric"] == "sink_mass")
    assert sink["mean"] == pytest.approx(per_item[[f"q{i}" for i in range(0, 8, 2)]].mean())
    assert (tmp_path / "out" / "summary-lens.png").stat().st_size > 1000


def test_sweep_report_cli_escapes_user_data(tiny_dir, tmp_path, capsys):
    from mechvis.cli import main

    items = [{"id": "<b>x</b>", "prompt": "a b c", "condition": "<script>alert(1)</script>", "pair": "p"},
             {"id": "y", "prompt": "a b d", "condition": "plain", "pair": "p"}]
    dataset = write_jsonl(tmp_path / "d.jsonl", items)
    assert main(["sweep", str(dataset), "-a", "lens", "-o", str(tmp_path / "out"), "--model", str(tiny_dir)]) == 0
    assert "2 items in 1 shards: 1 run" in capsys.readouterr().out
    assert main(["sweep-report", str(tmp_path / "out")]) == 0
    page = (tmp_path / "out" / "sweep-report.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "data:image/png;base64," in page
    assert main(["sweep", str(dataset), "-a", "lens", "-o", str(tmp_path / "out"), "--param", "lens.k"]) == 2


# --- real data --------------------------------------------------------------------------------

def test_example_dataset_is_real_and_offline(tmp_path):
    from PIL import Image

    from mechvis.sweep.example import PHOTOS, build_example

    paths = build_example(tmp_path)
    text = read_dataset(paths["text"])
    assert len({item.pair for item in text if item.pair}) == 40
    assert len([item for item in text if item.condition != "context"]) == 300
    assert all(item.continuation.startswith(" ") and item.prompt[0].isupper() for item in text)
    images = read_dataset(paths["images"])
    assert len(images) == 2 * len(PHOTOS) == 14
    original, blanked = (np.asarray(Image.open(item.image)) for item in images[:2])
    h, w = original.shape[:2]
    assert (blanked[h // 3 + 1 : 2 * h // 3 - 1, w // 3 + 1 : 2 * w // 3 - 1] == 128).all()
    assert (blanked[: h // 3] == original[: h // 3]).all() and not (original[h // 2, w // 2] == 128).all()


@pytest.mark.integration
def test_example_sweep_on_the_embedded_model(embedded, embedded_reference, tmp_path, capsys):
    from mechvis.cli import main

    out = tmp_path / "example"
    assert main(["sweep", "--example", "--example-items", "6", "-o", str(out)]) == 0
    lens = read_sweep(out, "lens").to_pandas()
    items = read_dataset(out / "example-data" / "text.jsonl")
    assert list(dict.fromkeys(lens["item_id"])) == [item.id for item in items]
    item = items[0]
    prompt_ids = embedded.hf_tokenizer(item.prompt)["input_ids"]
    target = embedded.hf_tokenizer.encode(item.continuation, add_special_tokens=False)[0]
    with torch.no_grad():
        final = embedded_reference(torch.tensor([prompt_ids])).logits[0, -1].double().softmax(-1)
    last = lens[lens["item_id"] == item.id].iloc[-1]
    assert last["target_id"] == target
    assert last["target_prob"] == pytest.approx(final[target].item(), rel=1e-4, abs=1e-7)
    assert last["top1_prob"] == pytest.approx(final.max().item(), rel=1e-4)
    assert json.loads((out / "summary.json").read_text())["lens"]["n_items"] == len(items)


def test_image_sweep_on_real_photos_against_hf_attentions(tokenizer_dir, tmp_path):
    """The paired photo conditions (original / centre blanked) through a tiny LLaVA: image mass
    and the entropy of the head-summed map over the 4 × 4 image tokens, against HF's attentions."""
    from mechvis.sweep.example import build_example
    from tests.test_vlm import tiny_llava as tiny_llava_fixture

    bridge, reference, processor = tiny_llava_fixture.__wrapped__(tokenizer_dir)
    model_dir = tmp_path / "llava"
    reference.save_pretrained(model_dir)  # only for the fingerprint's weight hash
    paths = build_example(tmp_path / "data", n_sentences=1, n_paired=0, max_side=64)
    result = run_sweep(paths["images"], tmp_path / "out", ["image"], model=str(model_dir), loaded_model=bridge, progress=False)
    assert result.n_items == 14
    rows = read_sweep(tmp_path / "out", "image").to_pandas()
    assert set(rows["condition"]) == {"original", "blanked"} and len(rows) == 14 * 2  # 2 LM layers
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert {r["n_pairs"] for r in summary["image"]["paired"]} == {7}
    for item in read_dataset(paths["images"])[:2]:
        from PIL import Image

        inputs = processor(text="<image>\n" + item.prompt, images=Image.open(item.image).convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            attentions = reference(**inputs, output_attentions=True).attentions  # the language model's, per layer
        cells = (inputs["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).nonzero()[:, 0]
        last = torch.stack(attentions)[:, 0, :, -1].double().numpy()  # layer head key
        to_image = last[..., cells.numpy()]
        got = rows[rows["item_id"] == item.id]
        np.testing.assert_allclose(got["image_mass"], to_image.sum(-1).mean(-1), atol=1e-5)
        np.testing.assert_allclose(got["entropy"], stats.entropy(to_image.sum(1), axis=-1), atol=1e-5)
        # the rollout summary: vision_rollout called directly on the item's full cache, summarised with numpy/scipy
        from mechvis.analysis.vision import vision_rollout

        run = mechvis.run(bridge, item.model_prompt, chat=item.chat, image=item.image)
        rolled = vision_rollout(run.cache, grid=run.segments.image_grid, query_positions=[len(run.tokens) - 1])
        patch_map = rolled.maps[0].double().numpy()
        peak_row, peak_col = np.unravel_index(patch_map.argmax(), rolled.patch_shape)
        assert set(got["rollout_peak_row"]) == {peak_row} and set(got["rollout_peak_col"]) == {peak_col}
        np.testing.assert_allclose(got["rollout_image_mass"], rolled.image_mass[0].item(), atol=1e-6)
        np.testing.assert_allclose(got["rollout_peak_mass"], patch_map.max(), atol=1e-6)
        np.testing.assert_allclose(got["rollout_entropy"], stats.entropy(patch_map), atol=1e-6)


def test_equal_length_items_share_a_forward_and_rows_still_equal_the_analyses(tiny_dir, tiny_model, tmp_path, monkeypatch):
    """Batching: text items of equal token length (plain prompts; prompt + continuation) run in
    one forward per shard; every row still equals calling the analysis on the item alone (≤ 1e-6)
    and the unbatched sweep's row."""
    from mechvis.analysis import head_entropy, logit_lens, token_signals
    from mechvis.sweep import analyses as sweep_analyses

    items = prompts(6) + [{"id": f"c{i}", "prompt": f"The {word} is", "continuation": " very old"}
                          for i, word in enumerate(["river", "city", "garden"])]
    dataset = write_jsonl(tmp_path / "d.jsonl", items)
    forwards = []
    real = type(tiny_model).run_with_cache

    def counting(self, tokens, *args, **kwargs):
        forwards.append(tuple(tokens.shape))
        return real(self, tokens, *args, **kwargs)

    monkeypatch.setattr(type(tiny_model), "run_with_cache", counting)
    batches = []
    original_init = sweep_analyses.BatchedForwards.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        batches.extend(len(batch) for batch in self.batches)

    monkeypatch.setattr(sweep_analyses.BatchedForwards, "__init__", recording_init)
    analyses = ["lens", "heads", "tokens"]
    run_sweep(dataset, tmp_path / "batched", analyses, loaded_model=tiny_model, model=str(tiny_dir), shard_size=9,
              progress=False, summary=False)
    assert sorted(batches) == [3, 6] and sorted(shape[0] for shape in forwards) == [3, 6]  # 9 items, 2 forwards
    forwards.clear()
    run_sweep(dataset, tmp_path / "single", analyses, loaded_model=tiny_model, model=str(tiny_dir), shard_size=9,
              progress=False, summary=False, batch=False)
    assert [shape[0] for shape in forwards] == [1] * 9
    for name in analyses:
        batched, single = (read_sweep(tmp_path / out, name).to_pandas() for out in ("batched", "single"))
        assert batched.columns.tolist() == single.columns.tolist() and len(batched) == len(single)
        for column in batched.columns:
            if batched[column].dtype.kind == "f":  # float32 rounding of the batched matrix products: ≤ 1e-6 relative
                np.testing.assert_allclose(batched[column], single[column], rtol=1e-6, atol=1e-6)
            elif batched[column].dtype.kind != "O" or isinstance(batched[column].iloc[0], str):
                assert batched[column].tolist() == single[column].tolist()
    monkeypatch.undo()
    lens, heads, tokens = (read_sweep(tmp_path / "batched", name).to_pandas() for name in analyses)
    for item in items:  # the known answer, as in test_rows_equal_the_analyses_and_a_plain_hf_forward
        if "continuation" in item:
            trace = mechvis.teacher_force(tiny_model, item["prompt"], item["continuation"])
            run, position, target = trace.run, trace.prompt_length - 1, trace.generated_ids[0]
        else:
            run = mechvis.run(tiny_model, item["prompt"])
            position, target = len(run.tokens) - 1, None
        direct = logit_lens(run.cache, tiny_model, positions=[position], target=target, k=3)
        rows = lens[lens["item_id"] == item["id"]]
        np.testing.assert_allclose(np.stack(rows["top_probs"]), direct.top_probs[:, 0].numpy(), atol=1e-6)
        np.testing.assert_allclose(rows["kl_from_final"], direct.kl_from_final[:, 0].numpy(), atol=1e-6)
        assert rows["top1_token"].tolist() == [row[0][0] for row in direct.top_tokens]
        np.testing.assert_allclose(heads[heads["item_id"] == item["id"]]["sink_mass"],
                                   head_entropy(run.cache, tiny_model).mean_sink_mass.flatten().numpy(), atol=1e-6)
        np.testing.assert_allclose(tokens[tokens["item_id"] == item["id"]]["entropy"],  # ~10.8 nats: 1e-6 relative
                                   token_signals(run.logits, run.tokens).entropy.numpy(), rtol=1e-6, atol=1e-6)
