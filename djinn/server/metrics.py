"""Prometheus metrics (`GET /metrics`).

Engine counters are read from `engine.stats` (plain counters, safe to read from another thread); sessions
by state and KV pool use are fetched through the engine thread at scrape time. Each app has its own
registry, so several servers can live in one process (tests).

- djinn_sessions{state}                      sessions by state (idle, running, paused, swapped)
- djinn_generated_tokens_total               generated tokens (rate() of it is tokens/s)
- djinn_processed_tokens_total               tokens that went through the model (prompts included)
- djinn_step_seconds (summary: _count/_sum)  engine step latency; djinn_last_step_seconds the latest one
- djinn_kv_blocks_used / djinn_kv_blocks_total / djinn_kv_pool_utilization {model, pool=device|host}
- djinn_requests_waiting{model} / djinn_request_longest_wait_seconds{model}   calls queued for KV memory
- djinn_pauses_total                         breakpoint pauses
- djinn_graphs_recorded_total / djinn_graph_record_seconds_total   CUDA graphs captured (and the time it took)
- djinn_requests_finished_total              generate calls that ran to completion
- djinn_errors_total{code}                   typed errors sent to clients, by stable code
- djinn_active_streams                       open WebSocket streams
- djinn_session_idle_ttl_seconds / djinn_session_pause_ttl_seconds   how long an untouched / paused session lives
- djinn_runs_active / djinn_run_sessions     runs of many prompts going, and the sessions their prompts hold
"""
from __future__ import annotations

from typing import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector:
    def __init__(self, metrics: "Metrics"):
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        st = self.m.stats
        snap = self.m.snapshot
        life = snap.get("lifetimes", {})
        for name, key, text in (("djinn_session_idle_ttl_seconds", "idle_ttl", "Seconds an untouched session lives"),
                                ("djinn_session_pause_ttl_seconds", "pause_ttl", "Seconds a paused session lives"),
                                ("djinn_runs_active", "runs", "Runs of many prompts going"),
                                ("djinn_run_sessions", "run_sessions", "Sessions held by the prompts of runs")):
            if key in life:
                yield GaugeMetricFamily(name, text, value=life[key])
        by_state = GaugeMetricFamily("djinn_sessions", "Sessions by state", labels=["state"])
        for state, n in sorted(snap.get("by_state", {}).items()):
            by_state.add_metric([state], n)
        yield by_state
        yield CounterMetricFamily("djinn_generated_tokens", "Generated tokens (rate() is tokens per second)",
                                  value=st.tokens_generated)
        yield CounterMetricFamily("djinn_processed_tokens", "Tokens that went through the model",
                                  value=st.tokens_processed)
        yield CounterMetricFamily("djinn_pauses", "Breakpoint pauses", value=st.pauses)
        yield CounterMetricFamily("djinn_requests_finished", "Generate calls run to completion",
                                  value=st.requests_finished)
        yield CounterMetricFamily("djinn_graphs_recorded", "Step segments captured as CUDA graphs",
                                  value=st.graphs_recorded)
        yield CounterMetricFamily("djinn_graph_record_seconds", "Time spent capturing CUDA graphs",
                                  value=st.graph_record_seconds)
        yield SummaryMetricFamily("djinn_step_seconds", "Engine step latency", count_value=st.steps,
                                  sum_value=st.step_seconds)
        yield GaugeMetricFamily("djinn_last_step_seconds", "Latency of the latest engine step",
                                value=st.last_step_seconds)
        used = GaugeMetricFamily("djinn_kv_blocks_used", "KV blocks in use", labels=["model", "pool"])
        total = GaugeMetricFamily("djinn_kv_blocks_total", "KV blocks in the pool", labels=["model", "pool"])
        util = GaugeMetricFamily("djinn_kv_pool_utilization", "Fraction of KV blocks in use",
                                 labels=["model", "pool"])
        for model, u in sorted(snap.get("pool", {}).items()):
            for pool in ("device", "host"):
                n, t = u.get(f"{pool}_used", 0), u.get(f"{pool}_total", 0)
                used.add_metric([model, pool], n)
                total.add_metric([model, pool], t)
                util.add_metric([model, pool], n / t if t else 0.0)
        waiting = GaugeMetricFamily("djinn_requests_waiting", "Calls queued for KV memory", labels=["model"])
        longest = GaugeMetricFamily("djinn_request_longest_wait_seconds", "How long the first queued call has "
                                    "waited for KV memory", labels=["model"])
        for model, u in sorted(snap.get("pool", {}).items()):
            waiting.add_metric([model], u.get("waiting", 0))
            longest.add_metric([model], u.get("longest_wait", 0.0))
        yield used
        yield total
        yield util
        yield waiting
        yield longest


class Metrics:
    def __init__(self, stats):
        self.stats = stats
        self.snapshot: dict = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.errors = Counter("djinn_errors", "Typed errors sent to clients, by code", ["code"],
                              registry=self.registry)
        self.active_streams = Gauge("djinn_active_streams", "Open WebSocket streams", registry=self.registry)
        self.registry.register(_EngineCollector(self))

    def error(self, code: str) -> None:
        self.errors.labels(code=code).inc()

    async def render(self, call: Callable[..., Awaitable]) -> bytes:
        self.snapshot = {"by_state": await call("sessions_by_state"), "pool": await call("pool_usage"),
                         "lifetimes": await call("lifetimes")}
        return generate_latest(self.registry)
