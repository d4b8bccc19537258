"""The webhook sink against a real local HTTP server that fails on demand: delivery exactly once after
de-duplication, order, restarts, permanent errors, caps, the three templates, secrets, and the wiring."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from agent_proc import MODEL
from conftest import free_port, write_agent_config
from pydantic import ValidationError

from agent import metrics
from agent.config import AgentConfig, ConfigError, load_config, parse_config, warnings_for
from agent.types import Event
from agent.uplink import Outbox, encode_payload
from agent.webhook import (
    WebhookConfig,
    WebhookSink,
    backoff_delay,
    check_url,
    is_retryable,
    parse_retry_after,
    render,
)

GATEWAY = "gw-01"
MODEL_ID = "default-0123abcd4567"
TOKEN = "tok-9f8e7d6c5b4a-SECRET"


# -- a real HTTP endpoint that can be told to fail --------------------------------------------------


@dataclass
class Behaviour:
    """How the endpoint answers one request: a status (after `hang_s`), extra headers, a body."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    hang_s: float = 0.0
    echo_auth: bool = False  # answer with the Authorization header in the body (a careless receiver)


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def key(self) -> str:
        return self.headers["Idempotency-Key"]


class Endpoint:
    """http.server on 127.0.0.1:<port> in a thread. Records every request on arrival; answers 200 unless
    a scripted Behaviour is queued; `stop()` closes the socket, so connections are refused."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[Request] = []
        self.plan: deque[Behaviour] = deque()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def fail(self, *behaviours: Behaviour) -> None:
        with self.lock:
            self.plan.extend(behaviours)

    def start(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with endpoint.lock:
                    b = endpoint.plan.popleft() if endpoint.plan else Behaviour()
                    endpoint.requests.append(
                        Request(self.path, dict(self.headers.items()), body, b.status, time.monotonic())
                    )
                if b.hang_s:
                    time.sleep(b.hang_s)
                reply = b'{"ok":true}' if b.status < 300 else b"no"
                if b.echo_auth:
                    reply = f"bad request; you sent {self.headers.get('Authorization')}".encode()
                try:
                    self.send_response(b.status)
                    for k, v in b.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    self.wfile.write(reply)
                except OSError:  # the client gave up (timeout) and closed the connection
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.block_on_close = False  # a hung handler must not hold up stop()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def seen(self) -> list[Request]:
        with self.lock:
            return list(self.requests)

    def application(self) -> list[dict]:
        """What an application behind the endpoint processed: 2xx bodies, duplicates dropped by msg_id,
        in first-arrival order (what docs/webhook.md asks receivers to do)."""
        out, keys = [], set()
        for r in self.seen():
            if 200 <= r.status < 300 and r.key not in keys:
                keys.add(r.key)
                out.append(r.json)
        return out


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    ep = Endpoint()
    ep.start()
    yield ep
    ep.stop()


@pytest.fixture
def make_sink(db_path: Path) -> Iterator[Callable[..., WebhookSink]]:
    """WebhookSinks on the test's database, each stopped at the end of the test."""
    made: list[WebhookSink] = []

    def make(config: WebhookConfig, start: bool = True) -> WebhookSink:
        sink = WebhookSink(config, db_path)
        made.append(sink)
        if start:
            sink.start()
        return sink

    yield make
    for sink in made:
        sink.stop(timeout=1.0)


def config(url: str | None, **over: Any) -> WebhookConfig:
    """Small backoffs and timeouts so failures resolve in milliseconds."""
    base: dict[str, Any] = {
        "enabled": True,
        "url": url,
        "backoff_min_s": 0.02,
        "backoff_max_s": 0.1,
        "timeout_s": 0.5,
    }
    return WebhookConfig.model_validate({**base, **over})


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels or {}) or 0.0


# -- events -----------------------------------------------------------------------------------------


def alert(device: str = "pump-01", k: int = 0, n: int = 0, state: str = "open", **over: Any) -> Event:
    """Message n of alert k of `device`, shaped like agent/alert.py's (docs/mqtt.md)."""
    alert_id = hashlib.sha256(f"{device}|{k}|{MODEL_ID}".encode()).hexdigest()[:16]
    opened = 1767225600.125 + 3600 * k
    payload: dict[str, Any] = {
        "v": 1,
        "type": "alert",
        "msg_id": f"{alert_id}:{n}",
        "alert_id": alert_id,
        "state": state,
        "gateway": GATEWAY,
        "device": device,
        "model_id": MODEL_ID,
        "ts": opened + 10 * n,
        "opened_ts": opened,
        "resolved_ts": opened + 10 * n if state == "resolve" else None,
        "score": 0.91,
        "threshold": 0.42,
        "peak": 1.3,
        "severity": "critical",
        "top_sensors": [{"channel": "vibration", "share": 0.71}, {"channel": "pressure", "share": 0.2}],
        "windows": 3 + n,
    }
    payload.update(over)
    return Event("alert", device, payload)


def health(device: str = "pump-02", state: str = "raised", **over: Any) -> Event:
    event_id = hashlib.sha256(f"stuck|{device}".encode()).hexdigest()[:16]
    payload: dict[str, Any] = {
        "v": 1,
        "type": "health",
        "msg_id": f"{event_id}:{0 if state == 'raised' else 1}",
        "event_id": event_id,
        "state": state,
        "gateway": GATEWAY,
        "device": device,
        "channel": "temperature",
        "kind": "stuck",
        "ts": 1767225604.0,
        "detail": "30 readings within 0.0 of each other",
        "count": 30,
    }
    payload.update(over)
    return Event("health", device, payload)


def drift(device: str = "pump-01", state: str = "drifted") -> Event:
    payload = {
        "v": 1,
        "type": "drift",
        "msg_id": f"drift-{device}-1765065600000",
        "gateway": GATEWAY,
        "device": device,
        "model_id": MODEL_ID,
        "ts": 1765065600.0,
        "since": 1764979200.0,
        "state": state,
        "drifted": ["temperature"] if state == "drifted" else [],
        "reference": None,
        "shift_threshold": 0.6,
        "score_ratio": 1.5,
        "channels": {},
        "score": {"ratio": 1.02, "drifted": False},
    }
    return Event("drift", device, payload)


def lifecycle(devices: list[str], alerts_per_device: int = 2) -> list[Event]:
    """open, update, resolve for each alert, devices interleaved (as a busy gateway produces them)."""
    out = []
    for k in range(alerts_per_device):
        for n, state in enumerate(("open", "update", "resolve")):
            out += [alert(d, k, n, state) for d in devices]
    return out


def schema(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(json.loads((files("agent") / "schemas" / name).read_text()))


# -- delivery ---------------------------------------------------------------------------------------


def test_every_event_arrives_once_after_dedup_in_order_through_failures(
    endpoint: Endpoint, make_sink: Callable[..., WebhookSink]
) -> None:
    """500, 503, a hang past the timeout, 429 with Retry-After, 502: all retried, none lost or reordered."""
    endpoint.fail(
        Behaviour(500),
        Behaviour(503),
        Behaviour(200, hang_s=2.0),  # the endpoint processes it but answers after our timeout
        Behaviour(429, headers={"Retry-After": "1"}),
        Behaviour(502),
    )
    events = lifecycle(["pump-01", "pump-02", "pump-03"])
    retried = sample("edgewatch_webhook_deliveries_total", {"result": "retried"})
    sink = make_sink(config(endpoint.url, timeout_s=0.5, backoff_max_s=2.0))
    for e in events:
        assert sink.enqueue(e)
    sent = [e.payload["msg_id"] for e in events]
    wait_until(lambda: sink.depth() == 0, what="the webhook outbox to drain")

    app = endpoint.application()
    assert [m["msg_id"] for m in app] == sent  # exactly once each, in enqueue order
    for device in ("pump-01", "pump-02", "pump-03"):
        assert [m["msg_id"] for m in app if m["device"] == device] == [
            e.payload["msg_id"] for e in events if e.device == device
        ]
    reqs = endpoint.seen()
    # the hung request reached the application and was sent again: a duplicate only dedup removes
    assert len({r.key for r in reqs if r.status == 200}) < len([r for r in reqs if r.status == 200])
    assert all(r.key == r.json["msg_id"] for r in reqs)  # the id is in the header and the body
    assert all(r.path == "/hook" and r.headers["Content-Type"] == "application/json" for r in reqs)
    # 500, 503, timeout, 429, 502: five retries; Retry-After (1 s) was honoured over a 20 ms backoff
    assert sample("edgewatch_webhook_deliveries_total", {"result": "retried"}) - retried == 5
    i = next(i for i, r in enumerate(reqs) if r.status == 429)
    assert reqs[i + 1].at - reqs[i].at >= 1.0
    assert reqs[1].at - reqs[0].at < 0.5  # a 500 waits only the backoff
    assert sink.outbox.dropped() == 0


def test_nothing_is_lost_across_a_restart_in_the_middle_of_an_outage(
    endpoint: Endpoint, make_sink: Callable[..., WebhookSink], db_path: Path
) -> None:
    cfg = config(endpoint.url)
    first = make_sink(cfg)
    assert first.enqueue(alert("pump-01", 0, 0))
    wait_until(lambda: first.depth() == 0, what="the first event")
    endpoint.stop()  # connections are refused from now on
    later = lifecycle(["pump-01", "pump-02"], 1)[1:]
    for e in later:
        assert first.enqueue(e)
    wait_until(lambda: first.outbox.peek(1)[0].attempts >= 2, what="a few refused attempts")
    first.stop()

    with sqlite3.connect(db_path) as conn:  # still on disk, in order
        stored = [r[0] for r in conn.execute("SELECT msg_id FROM webhook_outbox ORDER BY id")]
        assert conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 0  # not the MQTT outbox
    assert stored == [e.payload["msg_id"] for e in later]

    endpoint.start()  # same port
    second = make_sink(cfg)
    assert second.depth() == len(later)
    extra = alert("pump-02", 1, 0)
    assert second.enqueue(extra)
    wait_until(lambda: second.depth() == 0, what="the rest after the restart")
    assert [m["msg_id"] for m in endpoint.application()] == [
        alert("pump-01", 0, 0).payload["msg_id"],
        *stored,
        extra.payload["msg_id"],
    ]
    assert [r.key for r in endpoint.seen()].count(alert("pump-01", 0, 0).payload["msg_id"]) == 1


@pytest.mark.parametrize("status", [400, 404, 301])
def test_a_permanent_error_is_dropped_counted_logged_and_does_not_block(
    status: int,
    endpoint: Endpoint,
    make_sink: Callable[..., WebhookSink],
    caplog: pytest.LogCaptureFixture,
    db_path: Path,
) -> None:
    endpoint.fail(Behaviour(status, headers={"Location": "http://elsewhere.example/"}))
    before = sample("edgewatch_webhook_outbox_dropped_total", {"reason": f"http_{status}"})
    failed = sample("edgewatch_webhook_deliveries_total", {"result": "failed"})
    events = lifecycle(["pump-01"], 1)
    sink = make_sink(config(endpoint.url))
    with caplog.at_level(logging.ERROR, logger="agent.webhook"):
        for e in events:
            assert sink.enqueue(e)
        wait_until(lambda: sink.depth() == 0, what="the outbox to drain")
    bad = events[0].payload["msg_id"]
    assert [r.key for r in endpoint.seen()] == [e.payload["msg_id"] for e in events]  # never retried
    assert [m["msg_id"] for m in endpoint.application()] == [e.payload["msg_id"] for e in events[1:]]
    assert sink.outbox.dropped_by_reason() == {f"http_{status}": 1}
    assert sink.outbox.dropped() == 1
    assert sample("edgewatch_webhook_outbox_dropped_total", {"reason": f"http_{status}"}) - before == 1
    assert sample("edgewatch_webhook_deliveries_total", {"result": "failed"}) - failed == 1
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert bad in record.getMessage() and f"answered {status}" in record.getMessage()
    assert "not retried" in record.getMessage()
    mqtt = Outbox(db_path)
    assert mqtt.dropped() == 0  # the MQTT outbox's counters are not touched
    mqtt.close()


@pytest.mark.parametrize(
    ("policy", "stored", "kept"),
    [("drop_oldest", [True] * 5, [2, 3, 4]), ("reject_new", [True] * 3 + [False] * 2, [0, 1, 2])],
)
def test_caps_apply_the_drop_policy_and_count_every_drop(
    policy: str,
    stored: list[bool],
    kept: list[int],
    endpoint: Endpoint,
    make_sink: Callable[..., WebhookSink],
    db_path: Path,
) -> None:
    reason = "evicted" if policy == "drop_oldest" else "rejected"
    before = sample("edgewatch_webhook_outbox_dropped_total", {"reason": reason})
    mqtt_before = sample("edgewatch_outbox_dropped_total", {"reason": reason})
    events = [alert("pump-01", k) for k in range(5)]
    sink = make_sink(config(endpoint.url, max_rows=3, drop_policy=policy), start=False)
    assert [sink.enqueue(e) for e in events] == stored
    assert sink.depth() == 3
    assert sink.outbox.dropped_by_reason() == {reason: 2}
    assert sample("edgewatch_webhook_outbox_dropped_total", {"reason": reason}) - before == 2
    assert sample("edgewatch_outbox_dropped_total", {"reason": reason}) == mqtt_before
    with sqlite3.connect(db_path) as conn:
        counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    assert counters == {"webhook_outbox_dropped": 2, f"webhook_outbox_dropped.{reason}": 2}
    sink.start()
    wait_until(lambda: sink.depth() == 0, what="the survivors")
    assert [m["msg_id"] for m in endpoint.application()] == [events[k].payload["msg_id"] for k in kept]


def test_expired_and_oversized_events_are_dropped_and_counted(
    endpoint: Endpoint, make_sink: Callable[..., WebhookSink], caplog: pytest.LogCaptureFixture
) -> None:
    sink = make_sink(
        config(endpoint.url, kinds=["alert", "health"], max_payload_bytes=1024, max_age_s=60), start=False
    )
    with caplog.at_level(logging.ERROR, logger="agent.webhook"):
        assert not sink.enqueue(health(detail="x" * 2000))
    assert "over max_payload_bytes = 1024" in caplog.text
    assert sink.enqueue(alert())
    assert sink.outbox.expire(now=time.time() + 61) == 1
    assert sink.outbox.dropped_by_reason() == {"payload_too_large": 1, "expired": 1}
    sink.start()
    assert sink.flush(2.0)
    assert endpoint.seen() == []


def test_a_duplicate_enqueue_is_a_noop_and_unsent_kinds_are_not_queued(
    endpoint: Endpoint, make_sink: Callable[..., WebhookSink]
) -> None:
    sink = make_sink(config(endpoint.url), start=False)  # kinds = ["alert"] by default
    assert sink.enqueue(alert())
    assert sink.enqueue(alert())  # same msg_id, still queued once
    assert not sink.enqueue(health())
    assert not sink.enqueue(drift())
    assert not sink.enqueue(Event("status", None, {"msg_id": "status:gw-01:1"}))
    assert sink.depth() == 1
    with pytest.raises(ValueError, match="has no msg_id"):
        sink.enqueue(Event("alert", "pump-01", {"type": "alert"}))
    sink.start()
    assert sink.flush(5.0)
    assert len(endpoint.seen()) == 1


# -- templates --------------------------------------------------------------------------------------


def test_raw_is_the_mqtt_payload_byte_for_byte_and_matches_the_schemas(
    endpoint: Endpoint, make_sink: Callable[..., WebhookSink]
) -> None:
    events = [
        alert(),
        alert(n=1, state="update"),
        alert(n=2, state="resolve"),
        health(),
        health(state="cleared"),
    ]
    sink = make_sink(config(endpoint.url, kinds=["alert", "health"]))
    for e in events:
        assert sink.enqueue(e)
    assert sink.flush(5.0)
    reqs = endpoint.seen()
    assert [r.body for r in reqs] == [encode_payload(e.payload) for e in events]
    for r in reqs:
        validator = schema(f"{r.json['type']}.json")
        assert not list(validator.iter_errors(r.json)), r.json
        assert "Authorization" not in r.headers


def test_slack_body_has_text_blocks_and_every_documented_field(
    endpoint: Endpoint, make_sink: Callable[..., WebhookSink]
) -> None:
    sink = make_sink(config(endpoint.url, template="slack", kinds=["alert", "health"]))
    for e in (alert(), alert(n=2, state="resolve"), health(device="<!channel> & co")):
        assert sink.enqueue(e)
    assert sink.flush(5.0)
    opened, resolved, sensor = (r.json for r in endpoint.seen())

    for body in (opened, resolved, sensor):
        assert set(body) == {"text", "blocks"}
        header, section, context = body["blocks"]
        assert header["type"] == "header" and header["text"]["type"] == "plain_text"
        assert 0 < len(header["text"]["text"]) <= 150
        assert section["type"] == "section" and 0 < len(section["fields"]) <= 10
        assert all(f["type"] == "mrkdwn" and len(f["text"]) <= 2000 for f in section["fields"])
        assert context["type"] == "context" and context["elements"][0]["type"] == "mrkdwn"

    fields = [f["text"] for f in opened["blocks"][1]["fields"]]
    assert fields == [
        "*Device*\npump-01",
        "*State*\nopen",
        "*Severity*\ncritical",
        "*Score / threshold*\n0.91 / 0.42",
        "*Peak*\n1.3",
        "*Top sensors*\nvibration 71 %, pressure 20 %",
        f"*Model*\n{MODEL_ID}",
    ]
    assert opened["text"].startswith("[critical] pump-01: anomaly opened, score 0.91 vs threshold 0.42")
    assert opened["blocks"][0]["text"]["text"] == "pump-01: anomaly open"
    assert f"msg_id `{alert().payload['msg_id']}`" in opened["blocks"][2]["elements"][0]["text"]
    assert "gateway `gw-01`" in opened["blocks"][2]["elements"][0]["text"]
    assert "anomaly resolved" in resolved["text"]
    assert "*State*\nresolve" in [f["text"] for f in resolved["blocks"][1]["fields"]]
    sensor_fields = [f["text"] for f in sensor["blocks"][1]["fields"]]
    assert "*Kind*\nstuck" in sensor_fields and "*Channel*\ntemperature" in sensor_fields
    # a device name cannot ping a channel or inject a link: Slack's control characters are escaped
    assert "&lt;!channel&gt; &amp; co" in sensor["text"] and "<!channel>" not in json.dumps(
        sensor["blocks"][1]
    )


def test_pagerduty_body_triggers_and_resolves_with_the_routing_key_from_the_environment(
    endpoint: Endpoint, make_sink: Callable[..., WebhookSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EW_TEST_PD_KEY", TOKEN)
    cfg = config(
        endpoint.url, template="pagerduty", kinds=["alert", "health", "drift"], token_env="EW_TEST_PD_KEY"
    )
    sink = make_sink(cfg)
    events = [alert(), alert(n=2, state="resolve"), health(), health(state="cleared"), drift()]
    for e in events:
        assert sink.enqueue(e)
    assert not sink.enqueue(drift("pump-02", state="learning"))  # nothing to tell PagerDuty yet
    assert sink.flush(5.0)
    reqs = endpoint.seen()
    assert all("Authorization" not in r.headers for r in reqs)  # the key travels in the body
    trig, res, h_trig, h_res, d_trig = (r.json for r in reqs)
    a = alert().payload

    assert set(trig) == {"routing_key", "event_action", "dedup_key", "client", "payload"}
    assert trig["routing_key"] == TOKEN and trig["event_action"] == "trigger"
    assert trig["dedup_key"] == a["alert_id"]
    p = trig["payload"]
    assert set(p) >= {"summary", "source", "severity", "custom_details"}
    assert p["severity"] == "critical" and p["source"] == "gw-01/pump-01"
    assert p["component"] == "pump-01" and p["group"] == "gw-01" and p["class"] == "anomaly"
    assert p["timestamp"] == "2026-01-01T00:00:00.125Z"
    assert 0 < len(p["summary"]) <= 1024 and "pump-01" in p["summary"]
    assert p["custom_details"] == a  # everything, msg_id included

    assert res == {
        "routing_key": TOKEN,
        "event_action": "resolve",
        "dedup_key": a["alert_id"],
        "client": "edgewatch",
    }
    h = health().payload
    assert h_trig["event_action"] == "trigger" and h_trig["dedup_key"] == h["event_id"]
    assert h_trig["payload"]["severity"] == "warning" and h_trig["payload"]["class"] == "sensor_stuck"
    assert h_res["event_action"] == "resolve" and h_res["dedup_key"] == h["event_id"]
    assert d_trig["event_action"] == "trigger" and d_trig["payload"]["severity"] == "info"
    assert d_trig["dedup_key"] == "drift:gw-01:pump-01"
    assert render("pagerduty", "drift", drift(state="stable").payload, "k")
    assert (
        json.loads(render("pagerduty", "drift", drift(state="stable").payload, "k") or b"")["event_action"]
        == "resolve"
    )


def test_nan_is_null_or_n_a_and_never_zero() -> None:
    a = alert(
        score=math.nan, threshold=math.inf, top_sensors=[{"channel": "vibration", "share": math.nan}]
    ).payload
    raw = json.loads(render("raw", "alert", a) or b"")
    assert raw["score"] is None and raw["threshold"] is None and raw["top_sensors"][0]["share"] is None
    slack = json.loads(render("slack", "alert", a) or b"")
    fields = [f["text"] for f in slack["blocks"][1]["fields"]]
    assert "*Score / threshold*\nn/a / n/a" in fields and "*Top sensors*\nvibration n/a" in fields
    assert "score n/a vs threshold n/a" in slack["text"]
    pd = json.loads(render("pagerduty", "alert", a, "k") or b"")
    assert pd["payload"]["custom_details"]["score"] is None
    assert " 0 " not in pd["payload"]["summary"] and "0.0" not in pd["payload"]["summary"]


# -- secrets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["env", "credential"])
def test_the_token_is_sent_as_a_bearer_header_and_never_logged_or_stored(
    where: str,
    endpoint: Endpoint,
    make_sink: Callable[..., WebhookSink],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    db_path: Path,
) -> None:
    if where == "env":
        monkeypatch.setenv("EW_TEST_WEBHOOK_TOKEN", TOKEN)
        secret = {"token_env": "EW_TEST_WEBHOOK_TOKEN"}
    else:
        creds = tmp_path / "creds"
        creds.mkdir()
        (creds / "webhook-token").write_text(TOKEN + "\n")
        monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
        secret = {"token_credential": "webhook-token"}
    # a 500 and a 400 whose body echoes the Authorization header: both get logged
    endpoint.fail(Behaviour(500), Behaviour(400, echo_auth=True))
    with caplog.at_level(logging.DEBUG, logger="agent.webhook"):
        sink = make_sink(config(endpoint.url, **secret))
        for e in lifecycle(["pump-01"], 1):
            assert sink.enqueue(e)
        wait_until(lambda: sink.depth() == 0, what="the outbox to drain")
    reqs = endpoint.seen()
    assert len(reqs) == 4
    assert all(r.headers["Authorization"] == f"Bearer {TOKEN}" for r in reqs)
    assert "answered 400" in caplog.text and "answered 500" in caplog.text
    assert "Bearer ********" in caplog.text  # the echo was logged, redacted
    assert TOKEN not in caplog.text
    sink.stop()
    for f in db_path.parent.glob(db_path.name + "*"):  # the database, its WAL and shm
        assert TOKEN.encode() not in f.read_bytes(), f


def test_a_missing_secret_keeps_the_events_until_it_appears(
    endpoint: Endpoint,
    make_sink: Callable[..., WebhookSink],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("EW_TEST_LATE_TOKEN", raising=False)
    with caplog.at_level(logging.WARNING, logger="agent.webhook"):
        sink = make_sink(config(endpoint.url, token_env="EW_TEST_LATE_TOKEN"))
        assert sink.enqueue(alert())
        wait_until(lambda: "env var EW_TEST_LATE_TOKEN is not set" in caplog.text, what="the warning")
    assert endpoint.seen() == [] and sink.depth() == 1
    monkeypatch.setenv("EW_TEST_LATE_TOKEN", TOKEN)
    wait_until(lambda: sink.depth() == 0, what="delivery once the secret exists")
    assert endpoint.seen()[0].headers["Authorization"] == f"Bearer {TOKEN}"


def test_the_url_can_come_from_the_environment_and_its_path_is_not_logged(
    endpoint: Endpoint,
    make_sink: Callable[..., WebhookSink],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Slack webhook URLs are secrets: url_env keeps them out of the file and the log."""
    secret_path = "/services/T000/B000/XXXXXXXXsecret"
    monkeypatch.setenv("EW_TEST_HOOK_URL", f"http://127.0.0.1:{endpoint.port}{secret_path}")
    endpoint.fail(Behaviour(503))
    with caplog.at_level(logging.DEBUG, logger="agent.webhook"):
        sink = make_sink(config(None, url_env="EW_TEST_HOOK_URL", template="slack"))
        assert sink.enqueue(alert())
        wait_until(lambda: sink.depth() == 0, what="delivery")
    assert [r.path for r in endpoint.seen()] == [secret_path] * 2
    assert "answered 503" in caplog.text and secret_path not in caplog.text
    assert f"http://127.0.0.1:{endpoint.port}" in caplog.text


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "expected"),
    [
        (
            {"url": "ftp://example.net/SECRETPATH"},
            "webhook.url: webhook url must start with http:// or https://",
        ),
        ({"url": None}, "webhook: webhook enabled but no endpoint: set url, url_env or url_credential"),
        (
            {"url": "https://user:pw@example.net/SECRETPATH"},
            "webhook.url: webhook url must not carry user:password@",
        ),
        (
            {"url": "https://example.net:99999/SECRETPATH"},
            "webhook.url: webhook url https://example.net: invalid port",
        ),
        ({"url": "https://"}, "webhook.url: webhook url https://...: no host"),
        (
            {"url": "http://hooks.example.net/SECRETPATH", "token_env": "T"},
            "to hooks.example.net in clear text",
        ),
        ({"url_env": "U"}, "webhook: give at most one of url, url_env, url_credential"),
        (
            {"token_env": "A", "token_credential": "b"},
            "webhook: give at most one of token_env, token_credential",
        ),
        ({"template": "pagerduty", "url": None}, "webhook: template 'pagerduty' needs the routing key"),
        ({"template": "teams"}, "webhook.template: input should be 'raw', 'slack' or 'pagerduty'"),
        ({"kinds": []}, "webhook.kinds: list should have at least 1 item"),
        ({"kinds": ["status"]}, "webhook.kinds[0]: input should be 'alert', 'health' or 'drift'"),
        ({"backoff_min_s": 5, "backoff_max_s": 1}, "webhook: backoff_max_s must be >= backoff_min_s"),
        ({"retries": 3}, "webhook.retries: unknown key"),
    ],
)
def test_bad_settings_are_refused_with_their_key_path_and_no_secret(
    over: dict[str, Any], expected: str, tmp_path: Path
) -> None:
    data = {
        "gateway": {"id": "gw-01", "state_dir": str(tmp_path)},
        "sources": [{"type": "serial", "name": "bus", "port": "/dev/ttyUSB0"}],
        "model": {"path": str(tmp_path)},
        "webhook": {"enabled": True, "url": "https://hooks.example.net/SECRETPATH", **over},
    }
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert any(expected in line for line in ei.value.errors), ei.value.errors
    assert "SECRETPATH" not in str(ei.value)  # a URL's path may be the secret (Slack)
    with pytest.raises(ValidationError):
        WebhookConfig.model_validate(data["webhook"])


def test_defaults_and_the_agent_config_section(tmp_path: Path) -> None:
    c = WebhookConfig()
    assert not c.enabled and c.kinds == ["alert"] and c.template == "raw"
    assert all(f.description for f in WebhookConfig.model_fields.values())
    assert check_url(" https://h.example/x?y=1 ") == "https://h.example/x?y=1"
    pd = WebhookConfig(enabled=True, template="pagerduty", token_env="K")
    assert pd.resolve_url() == "https://events.pagerduty.com/v2/enqueue"
    assert WebhookConfig(url="http://127.0.0.1:8080/x", token_env="K").url  # a token to this machine is fine
    data = {
        "gateway": {"id": "gw-01", "state_dir": str(tmp_path)},
        "sources": [{"type": "serial", "name": "bus", "port": "/dev/ttyUSB0"}],
        "model": {"path": str(tmp_path)},
        "webhook": {"enabled": True, "url_env": "EW_TEST_NOT_SET_URL", "kinds": ["alert", "health", "alert"]},
    }
    cfg = parse_config(data)
    assert isinstance(cfg, AgentConfig) and cfg.webhook.kinds == ["alert", "health"]
    assert any("webhook" in w and "EW_TEST_NOT_SET_URL is not set" in w for w in warnings_for(cfg))


def test_retry_rules() -> None:
    assert [
        s for s in (200, 301, 400, 401, 404, 408, 409, 413, 422, 429, 500, 502, 503, 599) if is_retryable(s)
    ] == [
        408,
        429,
        500,
        502,
        503,
        599,
    ]
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("-1") is None and parse_retry_after("nan") is None
    now = time.time()
    assert parse_retry_after(formatdate(now + 120, usegmt=True), now=now) == pytest.approx(120, abs=1)
    assert parse_retry_after(formatdate(now - 120, usegmt=True), now=now) == 0.0
    assert [backoff_delay(k, 0.5, 3.0, 0.0) for k in (1, 2, 3, 4, 5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    jittered = [backoff_delay(3, 1.0, 60.0, 0.2) for _ in range(200)]
    assert all(3.2 <= d <= 4.8 for d in jittered) and len(set(jittered)) > 100


# -- wiring into the agent --------------------------------------------------------------------------


def test_the_agent_sends_emitted_events_to_the_webhook_and_flushes_at_shutdown(
    endpoint: Endpoint, tmp_path: Path
) -> None:
    from agent.service import Agent

    cfg_file = write_agent_config(
        tmp_path,
        "gw-wh",
        MODEL,
        rest=f"""[uplink]
enabled = false
[metrics]
enabled = false
[webhook]
enabled = true
url = "{endpoint.url}"
kinds = ["alert"]
backoff_min_s = 0.02
backoff_max_s = 0.1
""",
    )
    agent = Agent(load_config(cfg_file), sources=[])
    assert agent.webhook is not None
    runner = threading.Thread(target=agent.run)
    runner.start()
    try:
        agent.submit(lambda: agent.emit(alert()))
        agent.submit(lambda: agent.emit(health()))  # not in kinds
        wait_until(lambda: len(endpoint.seen()) == 1, what="the alert at the endpoint")
        agent.submit(lambda: agent.emit(alert(n=1, state="update")))
    finally:
        agent.stop()  # the update may still be queued: shutdown's flush must deliver it
        runner.join(15)
    assert not runner.is_alive()
    assert [m["msg_id"] for m in endpoint.application()] == [
        alert().payload["msg_id"],
        alert(n=1).payload["msg_id"],
    ]
    with sqlite3.connect(tmp_path / "state" / "edgewatch.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM webhook_outbox").fetchone()[0] == 0


def test_long_texts_are_clipped_to_the_receivers_limits() -> None:
    """Slack refuses a block over its limits and PagerDuty a summary over 1024 characters: a long
    health detail or device name is shortened, not sent to be refused with a 400 (and dropped)."""
    long = health(device="d" * 300, detail="x" * 5000).payload
    slack = json.loads(render("slack", "health", long) or b"")
    assert len(slack["blocks"][0]["text"]["text"]) == 150 and slack["blocks"][0]["text"]["text"].endswith("…")
    assert len(slack["text"]) == 3000
    assert all(len(f["text"]) <= 2000 for f in slack["blocks"][1]["fields"])
    assert any(len(f["text"]) == 2000 for f in slack["blocks"][1]["fields"])
    pd = json.loads(render("pagerduty", "health", long, "k") or b"")
    assert len(pd["payload"]["summary"]) == 1024


def test_events_the_full_disk_cannot_take_are_held_then_delivered_in_order(
    endpoint: Endpoint, make_sink: Callable[..., WebhookSink]
) -> None:
    sink = make_sink(config(endpoint.url))
    events = lifecycle(["pump-01", "pump-02"], alerts_per_device=3)
    assert sink.enqueue(events[0])
    wait_until(lambda: sink.depth() == 0, what="the first event to go")
    conn = sink.outbox._conn
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")
    big = [Event(e.topic_kind, e.device, {**e.payload, "pad": "x" * 20_000}) for e in events[1:]]
    assert [sink.enqueue(e) for e in big] == [False] * len(big)  # not stored: held in memory
    assert len(sink.held) == len(big)
    conn.execute("PRAGMA max_page_count = 1073741823")  # space is back: the worker writes and sends them
    wait_until(lambda: len(sink.held) == 0 and sink.depth() == 0, what="the held events to go")
    assert [m["msg_id"] for m in endpoint.application()] == [e.payload["msg_id"] for e in events]
    assert sink.outbox.dropped() == 0
