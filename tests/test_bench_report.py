"""The benchmark's closing table: the committed GPU results render, and each verdict flips at its target."""
import copy
import json
import os

from benchmarks.bench_report import report

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def line_of(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def test_saved_results_render_with_their_figures():
    gpt2 = report(load("bench_gpt2_h100_c328c34.json"))
    r = load("bench_gpt2_h100_c328c34.json")
    assert f"{r['djinn_batch1_ms_per_token']:.3f}" in line_of(gpt2, "Djinn, batch 1")
    assert f"{r['hf_eager_ms_per_token'] / r['djinn_batch1_ms_per_token']:.1f}x" in line_of(gpt2, "HF eager ")
    assert gpt2.count("layer 6 ") == 2  # embedded and WebSocket
    rows = report(load("bench_throughput_h100_c328c34.json")).splitlines()
    assert sum(line.startswith("64 (") for line in rows) == 2


def test_verdicts_follow_the_targets():
    r = load("bench_gpt2_h100_c328c34.json")
    for speedup, word in ((100.5, "met"), (99.5, "MISSED")):
        near = copy.deepcopy(r)
        near["djinn_batch1_ms_per_token"] = r["hf_eager_ms_per_token"] / speedup
        assert line_of(report(near), "HF eager ").endswith(word)
    slow = copy.deepcopy(r)
    slow["djinn_batch1_ms_per_token"] = 0.51
    assert line_of(report(slow), "Djinn, batch 1").endswith("MISSED")
    layer = slow["seed_experiment"]["websocket"]["layers"]["6"]
    layer["breakpoint_round_trip_added_ms"], layer["checkpoint_dispatch_ms"] = 3.01, 1.0
    ws = report(slow).split("seed experiment, websocket")[1]
    assert "3.010 MISSED" in line_of(ws.split("\n", 1)[1], "layer 6") and "1.000 met" in ws

    # the time to the client's hands: shown where measured, said where the server left no stamps
    layer["pause_to_client_ms"] = 1.234
    slow["seed_experiment"]["embedded"]["layers"]["6"]["pause_to_client_ms"] = None
    text = report(slow)
    assert "1.234" in line_of(text.split("seed experiment, websocket")[1].split("\n", 1)[1], "layer 6")
    assert "not measured" in line_of(text.split("seed experiment, embedded")[1].split("\n", 1)[1], "layer 6")

    t = load("bench_throughput_h100_c328c34.json")
    row = next(x for x in t["rows"] if x["sessions"] == 64)
    for key in [k for k in row if "_running" in k]:  # as results made before the running sessions' figures
        del row[key]
    row["plain"], row["steer"], row["pause25"] = 0.605 * row["floor_tokens_per_s"], 0.5 * row["floor_tokens_per_s"], 0.0
    line = line_of(report(t), "64 (threads)")
    assert "60.5% met" in line and "82.6% MISSED" in line and "-100.0% MISSED" in line
    # with the running sessions' figures, the pausing target is judged on them, not on all sessions
    row["plain_running"], row["pause25_running"] = 1000.0, 950.0
    line = line_of(report(t), "64 (threads)")
    assert "-100.0%" in line and "-100.0% MISSED" not in line and "-5.0% met" in line
