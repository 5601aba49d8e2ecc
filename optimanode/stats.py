"""Request statistics: how each model's requests ended and how long they took, kept for the metrics endpoint.

How it works: ``Inference`` holds one ``RequestStats`` and calls ``finished`` once per request
(``Inference._counted``, around the request's whole way): a request that ran, whatever its
outcome, and one refused before it got a slot (``overloaded``, ``shutting_down`` or its deadline
while queued, ...; an unknown model's id is not counted, so a typo makes no new series). The
numbers live in ``prometheus_client`` metric objects that belong to no registry (each node has its
own, so two nodes in one process never share a series); ``collect`` hands their families to the
OpenMetrics endpoint (optimanode/openmetrics.py), which serves them beside what it reads from the
node at scrape time. An observation is a counter increment and three bucket lookups, so the node keeps these
whether or not the endpoint is on.

* ``optimanode_requests_total{model, outcome}``: the outcome is a Done's finish_reason (``stop``,
  ``length``, ``cancelled``, ``tool_calls``) or the error code the request ended with (docs/protocol.md).
* ``optimanode_request_duration_seconds{model}``: on the node, from the request's arrival at its
  model (queue wait included) to its end.
* ``optimanode_request_queue_seconds{model}``: the part of that spent waiting for a slot.
* ``optimanode_request_ttft_seconds{model}``: the worker's time to the first token (``Done.timings``:
  from the worker taking the request), for requests that ended with a Done.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.metrics_core import Metric

# Seconds. A 135M model on a small CPU answers a short prompt in tens of milliseconds; a 7B model
# writing 1000 tokens on a CPU takes minutes: the buckets cover both ends.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)


class RequestStats:
    """Counters and histograms of one node's requests; see the module docstring."""

    def __init__(self) -> None:
        self.requests = Counter("optimanode_requests", "Requests that ended, by model and outcome "
                                "(a finish_reason, or the error code they ended with).",
                                ["model", "outcome"], registry=None)
        self.duration = Histogram("optimanode_request_duration_seconds", "Requests' time on the node, from "
                                  "their arrival at the model (queue wait included) to their end.",
                                  ["model"], buckets=DURATION_BUCKETS, registry=None)
        self.queued = Histogram("optimanode_request_queue_seconds", "Requests' wait for a free slot of "
                                "their model.", ["model"], buckets=QUEUE_BUCKETS, registry=None)
        self.ttft = Histogram("optimanode_request_ttft_seconds", "Time to the first token, measured by the "
                              "worker from taking the request (requests that ended with a Done).",
                              ["model"], buckets=TTFT_BUCKETS, registry=None)

    def finished(self, model: str, outcome: str, *, duration_s: float, queued_s: float | None = None,
                 ttft_s: float | None = None) -> None:
        """One request of ``model`` ended with ``outcome``; ``queued_s`` None: it never got a slot."""
        self.requests.labels(model, outcome).inc()
        self.duration.labels(model).observe(max(0.0, duration_s))
        if queued_s is not None:
            self.queued.labels(model).observe(max(0.0, queued_s))
        if ttft_s is not None:
            self.ttft.labels(model).observe(max(0.0, ttft_s))

    def collect(self) -> Iterable[Metric]:
        for metric in (self.requests, self.duration, self.queued, self.ttft):
            yield from metric.collect()
