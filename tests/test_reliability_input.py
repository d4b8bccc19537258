"""Bad input: whatever arrives, the agent stays up and every input is either accepted or counted as
rejected with a specific reason. Adds to the parser properties of tests/test_parse.py what they did not
target (invalid UTF-8, enormous payloads, huge and negative numbers, NaN/inf literals, exact key sets),
runs generated junk through the whole pipeline, checks timestamp trouble at pipeline level, and fires
generated inputs at a running agent over MQTT, reading the counts back from its Prometheus endpoint.
`make soak` runs the live part with >= 100,000 inputs (soak_input.py).
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Iterator
from functools import cache
from itertools import pairwise
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from agent_proc import MODEL, start_agent, stop
from conftest import Broker, free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.bundle import load_bundle
from agent.db import open_db
from agent.parse import MAX_JSON_BYTES, MAX_LINE_BYTES, MAX_PAYLOAD_BYTES, parse_json, parse_line
from agent.pipeline import Pipeline, StageSettings, build_pipeline
from agent.types import RawMessage, Reading, Reject

TOPIC = "edgewatch/sensors/pump-01/telemetry"
REASONS = {
    "too_long", "encoding", "syntax", "checksum", "version", "schema",  # parse (docs/protocol.md)
    "nan", "range", "future", "duplicate", "out_of_order",  # validation
}  # fmt: skip
JSON_KEYS = ["v", "device", "seq", "ts", "values"]


def crc_line(body: bytes) -> bytes:
    return body + b"*" + f"{zlib.crc32(body):08X}".encode() + b"\n"


# --- parser properties test_parse.py does not target -----------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=MAX_JSON_BYTES))
def test_json_invalid_utf8_is_an_encoding_reject(raw: bytes) -> None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        r = parse_json(raw, TOPIC, 0.0)
        assert isinstance(r, Reject) and r.reason == "encoding", r
    else:
        assert isinstance(parse_json(raw, TOPIC, 0.0), Reading | Reject)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=40).filter(lambda b: any(x > 127 for x in b)))
def test_serial_non_ascii_with_a_valid_crc_is_an_encoding_reject(junk: bytes) -> None:
    """Invalid UTF-8 (or any non-ASCII) inside an otherwise well-formed line, CRC computed over it."""
    r = parse_line(crc_line(b"EW1,pump-01,1,1764806400000," + junk + b",2.3,3.2"), "p", 0.0)
    assert isinstance(r, Reject) and r.reason == "encoding", r


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.integers(min_value=MAX_PAYLOAD_BYTES + 1, max_value=16 * 2**20), st.sampled_from([b"{", b"x", b"\xff"])
)
def test_enormous_payloads_are_refused_by_size_first(size: int, fill: bytes) -> None:
    """Over the 64 KiB payload cap (the batch form's; docs/protocol.md, size rule) nothing is decoded."""
    r = parse_json(fill * size, TOPIC, 0.0)
    assert isinstance(r, Reject) and r.reason == "too_long"
    r = parse_line(b"EW1," + fill * size + b"\n", "p", 0.0)
    assert isinstance(r, Reject) and r.reason == "too_long"
    assert (
        len(r.raw) <= MAX_LINE_BYTES and len(r.detail) < 200
    )  # the reject does not keep the whole payload in memory


numbers = (
    st.integers(min_value=-(2**1100), max_value=2**1100)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, -0.0, -1, 2**53, 2**53 + 1, 2**32, 2**32 - 1, 1e308, -1e308, 5e-324])
)


@settings(max_examples=400, deadline=None)
@given(numbers, numbers, numbers)
def test_json_huge_negative_and_nonfinite_numbers(seq: float, ts: float, value: float) -> None:
    """JSON allows NaN/Infinity literals via Python; any number in any field: a Reading that keeps the
    value exactly (NaN stays NaN, never 0) or a schema reject; seq/ts only inside their ranges."""
    doc = {"v": 1, "device": "pump-01", "seq": seq, "ts": ts, "values": {"vibration": value}}
    r = parse_json(json.dumps(doc).encode(), TOPIC, 0.0)
    if isinstance(r, Reject):
        assert r.reason in ("schema", "too_long"), r
        return
    assert isinstance(seq, int) and isinstance(ts, int) and 0 <= seq <= 2**32 - 1 and 0 <= ts <= 2**53
    got = r.values["vibration"]
    assert (math.isnan(got) and math.isnan(value)) or got == float(value)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.sampled_from(JSON_KEYS), unique=True),
    st.dictionaries(
        st.text(min_size=1, max_size=6).filter(lambda k: k not in JSON_KEYS), st.integers(), max_size=3
    ),
)
def test_json_missing_or_extra_fields_are_schema_rejects(keys: list[str], extra: dict) -> None:
    full = {"v": 1, "device": "pump-01", "seq": 1, "ts": 1764806400000, "values": {"vibration": 2.0}}
    doc = {k: full[k] for k in keys} | extra
    r = parse_json(json.dumps(doc).encode(), TOPIC, 0.0)
    if set(keys) == set(JSON_KEYS) and not extra:
        assert isinstance(r, Reading)
    else:
        assert isinstance(r, Reject) and r.reason == "schema", r


# --- the whole pipeline ------------------------------------------------------------------------------


@cache
def _bundle():  # type: ignore[no-untyped-def]
    # from a private copy: the shipped model may be regenerated while the suite runs
    return load_bundle(shutil.copytree(MODEL, Path(tempfile.mkdtemp()) / "model"))


def make_pipeline(db_path: Path) -> tuple[Pipeline, list]:
    events: list = []
    return build_pipeline(StageSettings(), _bundle(), open_db(db_path), events.append), events


def valid_payload(device: str, seq: int, ts_ms: int, rnd: random.Random) -> bytes:
    values = {
        "temperature": round(rnd.uniform(38, 44), 2),
        "vibration": round(rnd.uniform(1.5, 3.0), 3),
        "pressure": round(rnd.uniform(3.0, 3.4), 3),
    }
    return json.dumps({"v": 1, "device": device, "seq": seq, "ts": ts_ms, "values": values}).encode()


def fuzz_inputs(
    n: int, seed: int, devices: int = 3, start_ms: int | None = None, max_huge: int = 300_000
) -> Iterator[tuple[str, bytes, bool]]:
    """`n` MQTT inputs (topic, payload, should_be_accepted): good readings with junk of every kind mixed
    in. A payload is marked accepted only when it is a well-formed, in-range, new reading."""
    rnd = random.Random(seed)
    now_ms = int(time.time() * 1000) if start_ms is None else start_ms
    first = now_ms - (n + 3600) * 1000  # every good reading is in the past, one second apart per device
    state = {f"pump-{i + 1:02d}": [0, first] for i in range(devices)}
    last: dict[str, bytes] = {}
    for _ in range(n):
        dev = rnd.choice(list(state))
        topic = f"edgewatch/sensors/{dev}/telemetry"
        seq, ts = state[dev]
        kind = rnd.random()
        if kind < 0.5 or dev not in last:
            state[dev] = [seq + 1, ts + 1000]
            last[dev] = valid_payload(dev, seq + 1, ts + 1000, rnd)
            yield topic, last[dev], True
            continue
        k = rnd.randrange(14)
        if k == 0:
            payload = rnd.randbytes(rnd.randrange(0, 300))
        elif k == 1:
            payload = last[dev][:-5] + b"\xc3\x28\xa0\xa1}"  # invalid UTF-8
        elif k == 2:
            payload = b"{" * rnd.randrange(MAX_JSON_BYTES + 1, max_huge)  # enormous
        elif k == 3:
            payload = last[dev]  # the same message again
        elif k == 4:
            payload = valid_payload(dev, seq + 1, ts - 5000, rnd)  # older than the last accepted
        elif k == 5:
            payload = valid_payload(dev, seq + 1, now_ms + 86_400_000 * 365, rnd)  # far future
        elif k == 6:
            payload = last[dev].replace(b'"temperature": ', b'"temperature": NaN, "x": ')
        elif k == 7:
            payload = last[dev].replace(b'"vibration": ', b'"vibration": -1e308, "x": ')
        elif k == 8:
            payload = last[dev].replace(b'"seq": ', b'"seq": -').replace(b'"ts": ', b'"extra": 1, "ts": ')
        elif k == 9:
            payload = json.dumps({"v": 1, "device": dev, "ts": ts}).encode()  # missing fields
        elif k == 10:
            payload = last[dev].replace(b'"ts": ', b'"ts": 9' + b"9" * rnd.randrange(20, 400) + b"0 + ")
        elif k == 11:
            payload = json.dumps([1, 2, {"v": 1}]).encode()
        elif k == 12:
            payload = b"[" * 5000 + b"]" * 5000  # nested beyond the JSON size cap
        else:
            payload = last[dev].replace(dev.encode(), b"pump-99")  # device does not match its topic
        yield topic, payload, False


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.binary(max_size=200) | st.sampled_from([b"", b"{}", b"null", b"NaN"]), max_size=30))
def test_pipeline_counts_every_junk_input_and_keeps_going(tmp_path_factory, junk: list[bytes]) -> None:
    pipeline, _ = make_pipeline(tmp_path_factory.mktemp("p") / "ew.db")
    rnd = random.Random(1)
    t0 = 1764806400
    good = [valid_payload("pump-01", i, (t0 + i) * 1000, rnd) for i in range(len(junk) + 1)]
    for i, raw in enumerate(junk):
        pipeline.process_raw(RawMessage(good[i], "mqtt", TOPIC, t0 + i))
        pipeline.process_raw(RawMessage(raw, "mqtt", TOPIC, t0 + i))
    pipeline.process_raw(RawMessage(good[-1], "mqtt", TOPIC, t0 + len(junk)))
    stats = pipeline.stats
    assert stats.accepted == len(good)  # junk between good readings costs no good reading
    assert stats.accepted + sum(stats.rejected.values()) == len(good) + len(junk)
    assert set(stats.rejected) <= REASONS
    pipeline.buffer.db.conn.close()


def test_mixed_fuzz_through_the_pipeline_matches_expectations(tmp_path: Path) -> None:
    """The same generator as the live test, in-process: accepted is exactly the good readings."""
    pipeline, _ = make_pipeline(tmp_path / "ew.db")
    inputs = list(fuzz_inputs(3000, seed=3, max_huge=20_000))
    for topic, payload, _ in inputs:
        pipeline.process_raw(RawMessage(payload, "mqtt", topic, time.time()))
    pipeline.buffer.flush()
    assert pipeline.stats.accepted == sum(ok for *_, ok in inputs)
    assert sum(pipeline.stats.rejected.values()) == sum(not ok for *_, ok in inputs)
    assert set(pipeline.stats.rejected) <= REASONS
    stored = pipeline.buffer.db.execute("SELECT count(*) FROM readings").fetchone()[0]
    assert stored == pipeline.stats.accepted
    assert pipeline.stats.windows > 0  # scoring went on through the junk


def test_a_batch_payload_goes_through_the_pipeline_like_its_readings_one_by_one(tmp_path: Path) -> None:
    """Each reading of a batch is validated, buffered, windowed and scored as if it had come alone:
    the same readings as single messages and as batches of 50 (with a duplicate, an older timestamp,
    a NaN and a malformed element among them) give the same counts, stored rows and scores."""
    t0, received = 1764806400, 1764806400 + 3600.0
    rnd = random.Random(7)
    docs: list[dict] = []
    for i in range(300):
        values = {
            "temperature": round(rnd.uniform(38, 44), 2),
            "vibration": round(rnd.uniform(1.5, 3.0), 3),
            "pressure": round(rnd.uniform(3.0, 3.4), 3),
        }
        docs.append({"seq": i, "ts": (t0 + i) * 1000, "values": values})
    docs[40] = dict(docs[39])  # duplicate
    docs[41] = dict(docs[41], ts=(t0 + 10) * 1000)  # older than the last accepted
    docs[42] = dict(docs[42], values={**docs[42]["values"], "vibration": None})  # NaN, never 0
    docs[43] = dict(docs[43], seq=-5)  # malformed: a parse reject of this reading alone
    runs = []
    for name, size in (("single", 1), ("batch", 50)):
        pipeline, events = make_pipeline(tmp_path / f"{name}.db")
        scores: list = []
        pipeline._on_judgement = lambda j, scores=scores: scores.append((j.score.end_ts, j.score.error))
        for k in range(0, len(docs), size):
            part = docs[k : k + size]
            doc = (
                {"v": 1, "device": "pump-01", **part[0]}
                if size == 1
                else {"v": 1, "device": "pump-01", "batch": part}
            )
            pipeline.process_raw(RawMessage(json.dumps(doc).encode(), "mqtt", TOPIC, received))
        pipeline.buffer.flush()
        rows = pipeline.buffer.db.execute(
            "SELECT device, ts, seq, received, values_json FROM readings ORDER BY rowid"
        ).fetchall()
        runs.append(
            (
                pipeline.stats.accepted,
                dict(pipeline.stats.rejected),
                rows,
                scores,
                [e.payload for e in events],
            )
        )
        pipeline.buffer.db.conn.close()
    single, batched = runs
    assert single[0] == 296 and single[1] == {"duplicate": 1, "out_of_order": 1, "nan": 1, "schema": 1}
    assert single[3], "windows must be scored for the comparison to mean anything"
    assert batched == single


def test_timestamps_duplicate_out_of_order_future_and_a_gateway_clock_jumping_back(tmp_path: Path) -> None:
    """Pipeline level: each timestamp problem is rejected with its reason and nothing else is lost; when
    the gateway clock jumps back an hour, readings that now look 'future' are refused (counted), and
    accepted again once the clock is right; the stored series stays strictly increasing."""
    pipeline, _ = make_pipeline(tmp_path / "ew.db")
    rnd = random.Random(2)
    t0 = 1764806400

    def feed(i: int, ts: int, clock: float) -> None:
        pipeline.process_raw(RawMessage(valid_payload("pump-01", i, ts * 1000, rnd), "mqtt", TOPIC, clock))

    for i in range(200):
        feed(i, t0 + i, t0 + i + 0.1)
    feed(199, t0 + 199, t0 + 199.5)  # duplicate
    feed(200, t0 + 150, t0 + 200.1)  # out of order
    feed(201, t0 + 10 * 86400, t0 + 201.1)  # ten days ahead of the gateway clock
    for i in range(200, 260):  # the gateway clock jumps back an hour for a minute
        feed(i, t0 + i, t0 + i - 3600.0)
    for i in range(260, 400):  # and is set right again
        feed(i, t0 + i, t0 + i + 0.1)
    stats = pipeline.stats
    assert stats.rejected == {"duplicate": 1, "out_of_order": 1, "future": 61}
    assert stats.accepted == 340
    pipeline.buffer.flush()
    ts = [r[0] for r in pipeline.buffer.db.execute("SELECT ts FROM readings ORDER BY rowid")]
    assert len(ts) == 340 and all(b > a for a, b in pairwise(ts))
    assert stats.windows > 0


# --- a running agent ---------------------------------------------------------------------------------


def fuzz_config(path: Path, state: Path, broker: Broker, metrics_port: int) -> Path:
    path.write_text(
        f"""
[gateway]
id = "gw-fuzz"
state_dir = "{state}"

[[sources]]
type = "mqtt"
name = "plant"
[sources.mqtt]
host = "127.0.0.1"
port = {broker.port}

[model]
path = "{MODEL}"

[uplink]
enabled = false

[metrics]
enabled = true
host = "127.0.0.1"
port = {metrics_port}
"""
    )
    return path


def scrape_counts(port: int) -> tuple[float, float]:
    """(accepted, rejected) summed over labels from the agent's Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    acc = rej = 0.0
    for m in re.finditer(r"^edgewatch_readings_(accepted|rejected)_total\{[^}]*\} (\S+)$", text, re.M):
        if m.group(1) == "accepted":
            acc += float(m.group(2))
        else:
            rej += float(m.group(2))
    return acc, rej


def run_live_fuzz(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen], n: int, seed: int, max_huge: int = 100_000
) -> dict:
    """Start an agent, publish `n` generated inputs, and check every one is counted; returns the counts."""
    mport = free_port()
    cfg = fuzz_config(tmp_path / "ew.toml", tmp_path / "state", broker, mport)
    model = shutil.copytree(MODEL, tmp_path / "model")  # the shipped model may be regenerated meanwhile
    cfg.write_text(cfg.read_text().replace(str(MODEL), str(model)))
    log = tmp_path / "agent.log"
    agent = start_agent(cfg, log)
    procs.append(agent)
    deadline = time.monotonic() + 60
    while "running" not in log.read_text():
        assert time.monotonic() < deadline and agent.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"fuzz-{seed}")
    pub.max_inflight_messages_set(200)
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    # Probe until the agent's subscription is in place (messages before it are not queued for it), then
    # take the counts as the baseline once any probe still in flight has landed.
    rnd, probe_ts = random.Random(0), int(time.time() * 1000) - 10 * 86_400_000
    while scrape_counts(mport) == (0.0, 0.0):
        assert time.monotonic() < deadline, "the agent never counted a probe reading"
        probe_ts += 1000
        pub.publish(
            "edgewatch/sensors/probe-00/telemetry", valid_payload("probe-00", 1, probe_ts, rnd), qos=1
        )
        time.sleep(0.2)
    time.sleep(1.0)
    acc0, rej0 = scrape_counts(mport)
    expected_ok = 0
    t0 = time.monotonic()
    try:
        pending: list[mqtt.MQTTMessageInfo] = []
        for topic, payload, ok in fuzz_inputs(n, seed, max_huge=max_huge):
            expected_ok += ok
            info = pub.publish(topic, payload, qos=1)
            assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
            pending.append(info)
            if len(pending) >= 500:  # bound what paho holds; the broker queues for the agent (QoS 1)
                pending[-1].wait_for_publish(120)
                pending.clear()
        if pending:
            pending[-1].wait_for_publish(120)
    finally:
        pub.loop_stop()
        pub.disconnect()
    deadline = time.monotonic() + max(30.0, n / 500)
    acc = rej = 0.0
    while time.monotonic() < deadline:
        assert agent.poll() is None, log.read_text()[-3000:]
        acc, rej = scrape_counts(mport)
        acc, rej = acc - acc0, rej - rej0
        if acc + rej >= n:
            break
        time.sleep(0.5)
    took = time.monotonic() - t0
    assert (acc, rej) == (expected_ok, n - expected_ok)
    assert stop(agent) == 0
    assert "Traceback" not in log.read_text()
    return {"inputs": n, "accepted": int(acc), "rejected": int(rej), "seconds": round(took, 1)}


@pytest.mark.timeout(120)
def test_live_agent_counts_every_generated_input(
    broker: Broker, tmp_path: Path, procs: list[subprocess.Popen]
) -> None:
    print(run_live_fuzz(broker, tmp_path, procs, n=3000, seed=11))
