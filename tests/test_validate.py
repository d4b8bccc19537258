"""Validator: each reject reason, reboot handling, restore after restart, metrics and rate-limited logs."""

from __future__ import annotations

import logging
import math

import pytest
from pydantic import ValidationError

from agent import metrics
from agent.types import Reading, Reject
from agent.validate import RateLimitedRejectLog, ValidationConfig, Validator

NOW = 1_764_806_400.0


def rd(ts: float, seq: int | None = None, device: str = "pump-01", **values: float) -> Reading:
    v = {"temperature": 40.0, "vibration": 2.0, "pressure": 3.0}
    v.update(values)
    return Reading(device=device, ts=ts, values=v, seq=seq)


def rejected(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("edgewatch_readings_rejected_total", {"reason": reason}) or 0.0


def accepted(device: str) -> float:
    return metrics.REGISTRY.get_sample_value("edgewatch_readings_accepted_total", {"device": device}) or 0.0


def test_accepts_a_normal_stream_and_counts_it() -> None:
    v = Validator()
    before = accepted("acc-dev")
    for i in range(5):
        assert isinstance(v.check(rd(NOW + i, i, device="acc-dev"), NOW + i), Reading)
    assert accepted("acc-dev") - before == 5


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_rejected_and_counted(bad: float) -> None:
    v = Validator()
    before = rejected("nan")
    r = v.check(rd(NOW, 1, pressure=bad), NOW)
    assert isinstance(r, Reject) and r.reason == "nan" and "pressure" in r.detail
    assert rejected("nan") - before == 1
    # the NaN reading was not remembered: the same ts with a real value is accepted
    assert isinstance(v.check(rd(NOW, 1), NOW), Reading)


@pytest.mark.parametrize(
    ("channel", "value", "ok"),
    [
        ("temperature", 150.0, True),
        ("temperature", 150.1, False),
        ("temperature", -40.5, False),
        ("vibration", -0.01, False),
        ("vibration", 100.0, True),
        ("pressure", 40.5, False),
        ("pressure", -1.0, True),
        ("flow_unknown", 1e9, True),  # unknown channels pass the range check
    ],
)
def test_default_ranges(channel: str, value: float, ok: bool) -> None:
    r = Validator().check(rd(NOW, 1, **{channel: value}), NOW)
    if ok:
        assert isinstance(r, Reading)
    else:
        assert isinstance(r, Reject) and r.reason == "range" and channel in r.detail


def test_configured_ranges_merge_over_defaults() -> None:
    cfg = ValidationConfig(ranges={"temperature": (0, 80), "flow": (0, 10)})
    v = Validator(cfg)
    assert v.check(rd(NOW, 1, temperature=90.0), NOW).reason == "range"  # type: ignore[union-attr]
    assert v.check(rd(NOW, 1, flow=11.0), NOW).reason == "range"  # type: ignore[union-attr]
    assert v.check(rd(NOW, 1, pressure=41.0), NOW).reason == "range"  # type: ignore[union-attr]  default kept
    assert isinstance(v.check(rd(NOW, 1, flow=5.0), NOW), Reading)


def test_bad_range_config_is_an_error() -> None:
    with pytest.raises(ValidationError, match="min < max"):
        ValidationConfig(ranges={"temperature": (10, 5)})
    with pytest.raises(ValidationError, match="Extra inputs"):
        ValidationConfig(max_future=3)  # type: ignore[call-arg]


def test_required_channels() -> None:
    v = Validator(ValidationConfig(required_channels=["flow"]))
    r = v.check(rd(NOW, 1), NOW)
    assert isinstance(r, Reject) and r.reason == "schema" and "flow" in r.detail


def test_duplicate_out_of_order_future() -> None:
    v = Validator()
    assert isinstance(v.check(rd(NOW, 10), NOW), Reading)
    assert v.check(rd(NOW, 10), NOW).reason == "duplicate"  # type: ignore[union-attr]
    assert v.check(rd(NOW, 11), NOW).reason == "duplicate"  # type: ignore[union-attr]  same ts
    assert v.check(rd(NOW + 1, 10), NOW).reason == "duplicate"  # type: ignore[union-attr]  same seq
    assert v.check(rd(NOW - 1, 9), NOW).reason == "out_of_order"  # type: ignore[union-attr]
    assert v.check(rd(NOW + 301, 11), NOW).reason == "future"  # type: ignore[union-attr]
    assert isinstance(v.check(rd(NOW + 299, 11), NOW), Reading)


def test_replay_without_clock_skips_future_check() -> None:
    v = Validator()
    assert isinstance(v.check(rd(NOW + 10_000, 1), None), Reading)
    assert v.check(rd(NOW + 10_000, 1), None).reason == "duplicate"  # type: ignore[union-attr]


def test_devices_are_independent() -> None:
    v = Validator()
    assert isinstance(v.check(rd(NOW, 5, device="a"), NOW), Reading)
    assert isinstance(v.check(rd(NOW, 5, device="b"), NOW), Reading)


def test_reboot_restarts_seq_at_zero() -> None:
    v = Validator()
    assert isinstance(v.check(rd(NOW, 1000), NOW), Reading)
    assert isinstance(v.check(rd(NOW + 5, 0), NOW + 5), Reading)
    assert isinstance(v.check(rd(NOW + 6, 0), NOW + 6), Reading)  # rebooted again right away
    assert v.check(rd(NOW + 6, 0), NOW + 6).reason == "duplicate"  # type: ignore[union-attr]
    assert isinstance(v.check(rd(NOW + 7, 1), NOW + 7), Reading)


def test_restore_prevents_reaccepting_stored_readings() -> None:
    v = Validator()
    v.restore({"pump-01": NOW + 10})
    assert v.check(rd(NOW + 10, 7), NOW).reason == "duplicate"  # type: ignore[union-attr]
    assert v.check(rd(NOW + 9, 6), NOW).reason == "out_of_order"  # type: ignore[union-attr]
    assert isinstance(v.check(rd(NOW + 11, 8), NOW), Reading)


def test_note_reject_counts_parse_rejects() -> None:
    v = Validator()
    before = rejected("checksum")
    v.note_reject(Reject("checksum", "bad crc"))
    assert rejected("checksum") - before == 1


def test_rate_limited_log_suppresses_and_reports_count(caplog: pytest.LogCaptureFixture) -> None:
    t = [0.0]
    limiter = RateLimitedRejectLog(10.0, clock=lambda: t[0])
    caplog.set_level(logging.WARNING, logger="agent.validate")
    wrote = [limiter(Reject("range", f"r{i}", device="d")) for i in range(50)]
    assert wrote == [True] + [False] * 49
    assert limiter(Reject("nan", "n", device="d"))  # another reason has its own budget
    t[0] = 10.5
    assert limiter(Reject("range", "later", device="d"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert "+49 more 'range' rejects" in lines[2]


def test_nan_is_reported_before_range_and_huge_finite_values_are_not_nan() -> None:
    """The NaN test is skipped when the values' sum is finite; it must still win over the range test,
    and finite values whose sum overflows to inf must not become a 'nan' reject."""
    v = Validator(ValidationConfig(ranges={"a": (-1.0, 1.0)}))
    out = v.check(rd(NOW, 1, a=5.0, b=math.nan), None)
    assert isinstance(out, Reject) and out.reason == "nan" and "b is nan" in out.detail
    out = v.check(rd(NOW, 2, a=0.5, b=1e308, c=1e308), None)
    assert isinstance(out, Reading)
    out = v.check(rd(NOW + 1, 3, a=0.5, b=-math.inf, c=math.inf), None)
    assert isinstance(out, Reject) and out.reason == "nan" and "b is -inf" in out.detail
    out = v.check(rd(NOW + 2, 4, a=5.0, b=1e308, c=1e308), None)
    assert isinstance(out, Reject) and out.reason == "range"
