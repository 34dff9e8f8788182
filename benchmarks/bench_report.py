"""The table `bench.py` prints last: one part's results beside the targets they are measured against, with
the ratios. Also renders saved results:

    python3 benchmarks/bench_report.py benchmarks/results/bench_gpt2_h100_c328c34.json [more.json ...]
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional


def table(headers: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell: the first left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def verdict(ok: Optional[bool]) -> str:
    return "" if ok is None else ("met" if ok else "MISSED")


def latency_report(r: dict) -> str:
    """A gpt2 or mistral part: decode against the floor and HF, then the seed experiment per mode and layer."""
    gpt2 = r["shape"] == "gpt2"
    ours, floor, hf = r["djinn_batch1_ms_per_token"], r["floor_batch1_ms_per_token"], r["hf_eager_ms_per_token"]
    rows = [["Djinn, batch 1", f"{ours:.3f}", f"{ours / floor:.2f}x floor",
             "<= 0.5 ms" if gpt2 else "<= 1.25x floor", verdict(ours <= 0.5 if gpt2 else ours / floor <= 1.25)],
            ["floor (bytes / copy bandwidth)", f"{floor:.3f}", "", "", ""],
            ["HF eager", f"{hf:.3f}", f"Djinn {hf / ours:.1f}x faster", ">= 100x" if gpt2 else "",
             verdict(hf / ours >= 100) if gpt2 else ""]]
    if "hf_eager_with_pause_hook_ms_per_token" in r:
        rows.append(["HF eager, pause hook every step", f"{r['hf_eager_with_pause_hook_ms_per_token']:.3f}", "", "", ""])
    if "hf_generate_ms_per_token" in r:
        rows.append(["HF generate()", f"{r['hf_generate_ms_per_token']:.3f}", "", "", ""])
    if "djinn_pause_every_step_ms_per_token" in r:
        p = r["djinn_pause_every_step_ms_per_token"]
        rows.append(["Djinn, pause every step", f"{p:.3f}", f"{r['hf_eager_with_pause_hook_ms_per_token'] / p:.1f}x"
                     " faster than HF's hook", "", ""])
    out = [f"{r['shape']} shape, {r['dtype']}, {r['gpu']}, torch {r['torch']}, copy bandwidth "
           f"{r['copy_bandwidth_GBps']:.0f} GB/s", "",
           table(["decode", "ms/token", "ratio", "target", ""], rows)]
    for mode, se in r["seed_experiment"].items():
        if not isinstance(se, dict):
            out += ["", f"seed experiment, {mode}: {se}"]
            continue
        rows = []
        for layer, x in se["layers"].items():
            rt = x["breakpoint_round_trip_added_ms"]
            rt_target = 0.5 if mode == "embedded" else 3.0
            to_client = x.get("pause_to_client_ms")  # older results lack it; None: not measured
            rows.append([f"layer {layer}", f"{x['token_agreement_unmodified']:.0%}",
                         "" if "pause_to_client_ms" not in x else
                         "not measured" if to_client is None else f"{to_client:.3f}",
                         f"{rt:.3f} {verdict(rt <= rt_target) if gpt2 else ''}".strip(),
                         f"{x['resume_to_token_ms']:.2f}",
                         f"{x['checkpoint_dispatch_ms']:.3f} {verdict(x['checkpoint_dispatch_ms'] <= 1.0)}",
                         f"{x['checkpoint_copy_ms']:.3f}",
                         f"{x['checkpoint_copy_GBps']:.1f} {verdict(x['checkpoint_copy_GBps'] >= 25)}",
                         f"{x['restore_plus_8_tokens_ms']:.2f}", "yes" if x["restore_continues_identically"] else "NO"])
        alone, beside = se["other_session_tokens_per_s_alone"], se["other_session_tokens_per_s_while_one_paused"]
        out += ["", f"seed experiment, {mode} ({se['prompt_tokens']}-token prompt, {se['new_tokens']} new tokens; "
                f"round trip over {se['round_trip_trials']} trials, the rest over {se['trials']}):",
                table(["pause at", "agreement", "pause->client ms",
                       f"round trip ms (<= {'0.5' if mode == 'embedded' else '3'})",
                       "resume->token ms", "checkpoint ms (<= 1)", "copy ms", "copy GB/s (>= 25)",
                       "restore+8 ms", "restore same"], rows),
                f"steering (scale 0.9 at the middle layer) changed {se['steer_scale_0.9_changed_fraction']:.0%} of "
                f"tokens; interactive edit equals the declarative Scale: "
                f"{'yes' if se['steer_interactive_equals_declarative'] else 'NO'}",
                f"another session: {alone:.1f} tok/s alone, {beside:.1f} while one sits paused "
                f"({beside / alone - 1:+.1%})"]
    return "\n".join(out)


def throughput_report(r: dict) -> str:
    """The throughput part: per session count, each mode's tokens/s, its share of the floor and the targets.
    The pausing target is judged on the sessions that keep running (the three quarters that never pause, against
    the same sessions in the plain mode) where the results have them, else on all sessions."""
    rows = []
    for row in r["rows"]:
        n, floor = row["sessions"], row["floor_tokens_per_s"]
        for via, suffix in (("threads", ""), ("sinks", "_engine_sinks")):
            plain, steer, paused = row["plain" + suffix], row["steer" + suffix], row["pause25" + suffix]
            share, kept, lost = plain / floor, steer / plain, paused / plain - 1
            running = None  # a lone session has no running neighbours, and older results lack the figure
            if "plain_running" + suffix in row:
                running = row["pause25_running" + suffix] / row["plain_running" + suffix] - 1
            rows.append([f"{n} ({via})", f"{plain:.0f}", f"{share:.1%} {verdict(share >= 0.6) if n == 64 else ''}".strip(),
                         f"{steer:.0f}", f"{kept:.1%} {verdict(kept >= 0.97) if n == 64 else ''}".strip(),
                         f"{paused:.0f}", f"{lost:+.1%} {verdict(lost >= -0.10) if running is None else ''}".strip(),
                         "" if running is None else f"{running:+.1%} {verdict(running >= -0.10)}", f"{floor:.0f}"])
    trials = r.get("trials", 1)
    recorded = [f"{row['sessions']}: {sum(sum(v) for k, v in row.items() if k.endswith('_graphs_recorded'))}"
                for row in r["rows"] if any(k.endswith("_graphs_recorded") for k in row)]
    captures = [f"CUDA graphs captured during the timed trials, by session count: {', '.join(recorded)}"] \
        if recorded else []
    return "\n".join([f"Mistral-7B shape, {r['gpu']}, torch {r['torch']}, copy bandwidth {r['copy_bandwidth_GBps']:.0f} "
                      f"GB/s; tokens/s, {'medians of ' + str(trials) + ' trials' if trials > 1 else 'one trial'}:",
                      table(["sessions", "plain", "of floor (>= 60% at 64)", "Steer", "of plain (>= 97% at 64)",
                             "25% pausing", "change", "running ones' change (>= -10%)", "floor"], rows), *captures])


def report(result: dict[str, Any]) -> str:
    return throughput_report(result) if "rows" in result else latency_report(result)


def main() -> None:
    for path in sys.argv[1:]:
        with open(path) as f:
            print(f"{path}\n{report(json.load(f))}\n")


if __name__ == "__main__":
    main()
