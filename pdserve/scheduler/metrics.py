"""Prometheus metrics of the scheduler (one CollectorRegistry per app, so tests and several apps
in one process do not collide). Names start with ``pdserve_scheduler_``."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

MAX_CACHED_CHILDREN = 4096  # label sets kept resolved; some values (model) come from clients
_LAT = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class SchedulerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "pdserve_scheduler_"
        self.requests = Counter(p + "requests_total", "Requests answered, by endpoint, HTTP status and model",
                                ["endpoint", "status", "model"], registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from request arrival to the first token "
                              "sent to the client", ["endpoint"], buckets=_LAT, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Gap between stream chunks relayed to the client",
                             ["endpoint"], buckets=_ITL, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request arrival to last byte",
                             ["endpoint"], buckets=_LAT, registry=r)
        self.prefill = Histogram(p + "prefill_seconds", "Duration of the prefill call (max_tokens=1)",
                                 ["instance"], buckets=_LAT, registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens (from usage)", registry=r)
        self.cached_tokens = Counter(p + "cached_prompt_tokens_total", "Prompt tokens served from the prefill "
                                     "instance's prefix cache", registry=r)
        self.completion_tokens = Counter(p + "completion_tokens_total", "Generated tokens", registry=r)
        self.inflight = Gauge(p + "inflight_requests", "Requests being processed", registry=r)
        self.instance_inflight = Gauge(p + "instance_inflight_requests", "Requests in flight per instance",
                                       ["role", "instance"], registry=r)
        self.instance_healthy = Gauge(p + "instance_healthy", "1 when the instance passes health checks",
                                      ["role", "instance"], registry=r)
        self.instance_prefill_backlog = Gauge(p + "instance_prefill_backlog_tokens", "Estimated prompt tokens "
                                              "routed to the instance and not yet computed (prefill calls in "
                                              "flight; decode-only requests before their first token); "
                                              "tracked with --decode-only-when-queued",
                                              ["role", "instance"], registry=r)
        self.queue_length = Gauge(p + "queue_length", "Requests waiting for a free slot", registry=r)
        self.retries = Counter(p + "retries_total", "Requests retried on another instance",
                               ["stage", "reason"], registry=r)
        self.rejected = Counter(p + "rejected_total", "Requests refused before reaching an instance (bad input, "
                                "missing API key, unknown model, too large, overload, draining), by HTTP status",
                                ["status"], registry=r)
        self.tpot = Histogram(p + "time_per_output_token_seconds", "Streams: (last chunk - first chunk) / (completion "
                              "tokens - 1)", ["endpoint"], buckets=_ITL, registry=r)
        self.kv_handover = Histogram(p + "kv_handover_seconds", "Streams in PD mode: from the prefill answer to the "
                                     "decode instance's first byte (KV pull + first decode step)", buckets=_LAT,
                                     registry=r)
        self.decode_only = Counter(p + "decode_only_total", "Requests served by a decode instance alone, without "
                                   "a remote prefill, by reason (short prompt, cached prefix, busy prefill pool, batch of "
                                   "prompts, prompt_logprobs, built-in tools, prefill failed)", ["reason"], registry=r)
        self.first_from_prefill = Counter(p + "first_token_from_prefill_total", "Answers whose first token came "
                                          "from the prefill instance's answer (the decode instance continued "
                                          "after it; streams and non-stream)", registry=r)
        self.leases_released = Counter(p + "kv_leases_released_total", "Prefill KV leases the scheduler released "
                                       "because no decode instance got the request (client gone, no decode slot, "
                                       "request refused); the rest end by pull or expiry", registry=r)
        self.capture_dropped = Counter(p + "capture_dropped_total", "Capture records dropped because the writer "
                                       "queue was full (requests are never slowed down for capture)", registry=r)
        self.draining = Gauge(p + "draining", "1 while the scheduler drains (refuses new requests) before exiting",
                              registry=r)

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, resolved once per label set: ``labels()`` takes a lock
        and re-checks the values on every call, which the request hot path should not pay. The
        cache is bounded; a label set past the bound is still counted, just not cached."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < MAX_CACHED_CHILDREN:
                self._children[key] = child
        return child

    def forget_model(self, model: str) -> None:
        """Drop the request series of a model name that is gone (an unloaded LoRA adapter), so
        loading and unloading adapters cannot grow the label set without bound."""
        for key in [k for k in self._children if k[0] == id(self.requests) and k[1][-1] == model]:
            del self._children[key]
            self.requests.remove(*key[1])

    def forget_instance(self, role: str, name: str) -> None:
        """Drop the series of an instance taken out of the pool."""
        for metric, labels in ((self.instance_inflight, (role, name)), (self.instance_healthy, (role, name)),
                               (self.instance_prefill_backlog, (role, name)), (self.prefill, (name,))):
            self._children.pop((id(metric), labels), None)
            try:
                metric.remove(*labels)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
