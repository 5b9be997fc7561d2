"""Prometheus metrics of a run (prometheus_client): what a plant's monitoring scrapes.

`--metrics_port N` serves them on http://127.0.0.1:N/metrics (the live modes and the console); the
console also serves them at its own /metrics, behind its token. Read-only: a scrape changes nothing.
It binds to loopback by default because metrics say what the line produces and when (and the endpoint
has no authentication): a Prometheus on another machine needs `--metrics_host` set to an address of the
plant network, deliberately.

| metric | type | what |
|---|---|---|
| mahalanobisad_images_total | counter | images scored |
| mahalanobisad_anomalies_total | counter | images scored ANOMALY |
| mahalanobisad_failures_total | counter | images that could not be read or scored |
| mahalanobisad_drifted_images_total | counter | scored images with conditions outside the training range |
| mahalanobisad_drift_warning | gauge | 1 while most recent images drift (conditions.DriftWindow) |
| mahalanobisad_score_shift_warning | gauge | 1 while recent images score above the training images' held-out median far more often than half the time (conditions.ScoreShiftWindow) |
| mahalanobisad_threshold | gauge | the image threshold now |
| mahalanobisad_score | histogram | image scores; buckets at multiples of the threshold at start |
| mahalanobisad_latency_seconds | histogram | image taken up (frame captured, file complete, upload received) to verdict |
| mahalanobisad_messages_sent_total{destination} | counter | messages a receiver acknowledged |
| mahalanobisad_messages_rejected_total{destination} | counter | messages a webhook refused with a 4xx no retry can fix (dropped) |
| mahalanobisad_messages_lost_total | counter | messages not stored: outbox or disk full |
| mahalanobisad_outbox_depth{destination} | gauge | messages waiting in the outbox |
| mahalanobisad_outbox_unsent_age_seconds | gauge | age of the oldest waiting message (0: none waits) |
"""
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import start_http_server

from errors import UsageError

DEFAULT_HOST = '127.0.0.1'
SCORE_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)  # times the threshold at start
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The metrics of one run in a registry of its own (see the module's table). threshold: a function
    giving the image threshold now; the score buckets are fixed from its value at start."""

    def __init__(self, threshold):
        self._server = None
        self.registry = registry = CollectorRegistry()
        self.images = Counter('mahalanobisad_images', 'images scored', registry=registry)
        self.anomalies = Counter('mahalanobisad_anomalies', 'images scored ANOMALY', registry=registry)
        self.failures = Counter('mahalanobisad_failures', 'images that could not be read or scored', registry=registry)
        self.drifted = Counter('mahalanobisad_drifted_images',
                               'scored images whose conditions were outside the training range', registry=registry)
        self.drift_warning = Gauge('mahalanobisad_drift_warning', '1 while most recent images drift',
                                   registry=registry)
        self.score_shift_warning = Gauge('mahalanobisad_score_shift_warning',
                                         '1 while recent images score above the training images\' held-out median '
                                         'far more often than half the time', registry=registry)
        Gauge('mahalanobisad_threshold', 'image score threshold', registry=registry).set_function(threshold)
        self.score = Histogram('mahalanobisad_score', 'image anomaly scores (buckets: multiples of the threshold at '
                               'start)', buckets=[round(r * threshold(), 6) for r in SCORE_BUCKETS], registry=registry)
        self.latency = Histogram('mahalanobisad_latency_seconds', 'image taken up to verdict, seconds',
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.sent = Counter('mahalanobisad_messages_sent', 'messages a receiver acknowledged', ['destination'],
                            registry=registry)
        self.rejected = Counter('mahalanobisad_messages_rejected',
                                'messages refused with a 4xx no retry can fix (dropped)', ['destination'],
                                registry=registry)
        self.lost = Counter('mahalanobisad_messages_lost', 'messages not stored: outbox or disk full',
                            registry=registry)
        self._depth = Gauge('mahalanobisad_outbox_depth', 'messages waiting in the outbox', ['destination'],
                            registry=registry)
        self._age = Gauge('mahalanobisad_outbox_unsent_age_seconds', 'age of the oldest waiting message',
                          registry=registry)

    def watch_outbox(self, outbox, destinations):
        """Outbox depth (per destination) and unsent age, read from `outbox` at each scrape."""
        for destination in destinations:
            self._depth.labels(destination).set_function(lambda d=destination: outbox.depth().get(d, 0))
            self.sent.labels(destination)  # listed (at 0) from the start
            self.rejected.labels(destination)
        self._age.set_function(outbox.oldest_age)

    def exposition(self):
        """The metrics in Prometheus' text format -> bytes (content type CONTENT_TYPE)."""
        return generate_latest(self.registry)

    def serve(self, port, host=DEFAULT_HOST):
        """Serve the metrics on http://host:port/metrics from a daemon thread (prometheus_client's server)."""
        try:
            self._server, _ = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise UsageError(f'--metrics_port {port}: cannot listen on {host}: {e.strerror or e}') from None

    def close(self):
        """Stop serving (if serve() was called)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
