"""Prometheus metrics, defined once so every stage counts into the same names.

Served by `edgewatch run` on the configured port (see [metrics] in the config). Each stage imports the
metric it updates; nothing here does I/O at import time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

READINGS_IN = Counter(
    "edgewatch_readings_accepted", "Readings that passed validation", ["device"], registry=REGISTRY
)
READINGS_REJECTED = Counter(
    "edgewatch_readings_rejected", "Inputs rejected, by reason code", ["reason"], registry=REGISTRY
)
WINDOWS_SCORED = Counter(
    "edgewatch_windows_scored", "Windows scored by the model", ["device"], registry=REGISTRY
)
SCORE_LATENCY = Histogram(
    "edgewatch_score_seconds",
    "Time to score one batch of windows",
    buckets=(0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 0.5),
    registry=REGISTRY,
)
ALERTS = Counter(
    "edgewatch_alert_events", "Alert events, by kind and state", ["kind", "state"], registry=REGISTRY
)
HEALTH_EVENTS = Counter(
    "edgewatch_health_events", "Sensor-health events, by kind and state", ["kind", "state"], registry=REGISTRY
)
OUTBOX_DEPTH = Gauge("edgewatch_outbox_depth", "Messages waiting in the outbox", registry=REGISTRY)
OUTBOX_DROPPED = Counter(
    "edgewatch_outbox_dropped",
    "Messages dropped because the outbox was full, by reason",
    ["reason"],
    registry=REGISTRY,
)
UPLINK_PUBLISHED = Counter(
    "edgewatch_uplink_acked", "Messages acknowledged by the upstream broker", registry=REGISTRY
)
UPLINK_CONNECTED = Gauge("edgewatch_uplink_connected", "1 while connected upstream", registry=REGISTRY)
THRESHOLD = Gauge(
    "edgewatch_threshold", "Current anomaly threshold per device", ["device"], registry=REGISTRY
)
LAST_SCORE = Gauge("edgewatch_score", "Last window score per device", ["device"], registry=REGISTRY)
BUFFER_DROPPED = Counter(
    "edgewatch_buffer_dropped",
    "Readings and scores dropped unwritten: the database refused writes past the in-memory bound",
    registry=REGISTRY,
)
DB_ERRORS = Counter("edgewatch_db_errors", "SQLite errors, by kind", ["kind"], registry=REGISTRY)
DRIFT_SHIFT = Gauge(
    "edgewatch_drift_shift_iqr",
    "Recent median of a channel minus its reference median, in reference IQRs (docs/drift.md); "
    "NaN while learning or short of data",
    ["device", "channel"],
    registry=REGISTRY,
)
DRIFT_SCORE_RATIO = Gauge(
    "edgewatch_drift_score_ratio",
    "Recent median window score over the reference median (docs/drift.md); NaN while learning",
    ["device"],
    registry=REGISTRY,
)
COMMANDS = Counter(
    "edgewatch_commands",
    "Commands received on <prefix>/<gateway>/cmd, by type and result (ok or the refusal reason)",
    ["type", "result"],
    registry=REGISTRY,
)
WEBHOOK_OUTBOX_DEPTH = Gauge(
    "edgewatch_webhook_outbox_depth", "Messages waiting in the webhook outbox", registry=REGISTRY
)
WEBHOOK_DELIVERIES = Counter(
    "edgewatch_webhook_deliveries",
    "Webhook POST attempts, by result: delivered (2xx), retried (connection error, timeout, 408, 429, "
    "5xx), failed (any other status: the message is dropped)",
    ["result"],
    registry=REGISTRY,
)
WEBHOOK_OUTBOX_DROPPED = Counter(
    "edgewatch_webhook_outbox_dropped",
    "Messages dropped from the webhook outbox, by reason (caps, expiry, payload bound, permanent error)",
    ["reason"],
    registry=REGISTRY,
)
SHADOW_WINDOWS = Gauge(
    "edgewatch_shadow_windows", "Windows scored by the candidate model in shadow (0: none)", registry=REGISTRY
)
SHADOW_AGREEMENT = Gauge(
    "edgewatch_shadow_agreement",
    "Share of windows on which the shadow model's verdict agrees with the current model's (NaN: none yet)",
    registry=REGISTRY,
)
MODEL_ROLLOUTS = Counter(
    "edgewatch_model_rollouts",
    "Model rollout outcomes: promoted, refused (disagreement), failed (error in shadow), rolled_back",
    ["result"],
    registry=REGISTRY,
)
SCREEN_WINDOWS = Counter(
    "edgewatch_screen_windows",
    "Windows the cheap screen decided on (docs/results.md, Cheap-screen ensemble), by decision: skipped "
    "(not scored), or sent to the autoencoder as flagged, every_k, warmup or hold (anomaly or open "
    "alert); screened = the sum, sent = the sum minus skipped",
    ["decision"],
    registry=REGISTRY,
)
