"""The cheap screen (agent/screen.py): its arithmetic on hand-made windows, per-device state, the hold
that keeps an open alert on the autoencoder, and the screened pipeline on a real model and SQLite."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import numpy as np
import pytest
from agent_proc import EDGEWATCH, MODEL

from agent import metrics
from agent.bundle import Bundle, load_bundle
from agent.config import ConfigError, parse_config
from agent.db import open_db
from agent.pipeline import Pipeline, StageSettings, build_pipeline
from agent.recording import read_recording
from agent.replay import ReplayResult, replay
from agent.screen import Screen, ScreenConfig, make_screen
from agent.threshold import ThresholdConfig
from agent.types import Judgement, Score, Window

STRIDE = 8
ONSET_S = 2400.0
PLAIN = StageSettings(screen=ScreenConfig(enabled=False))  # every window scored


def window(device: str, i: int, data: np.ndarray) -> Window:
    """The window ending on grid index i * STRIDE (period 1 s), so i is its every-k index."""
    end = float(i * STRIDE)
    return Window(device, end - len(data) + 1, end, data.astype(np.float32))


def verdict(w: Window, anomalous: bool = False) -> Judgement:
    return Judgement(
        Score(w.device, w.start_ts, w.end_ts, 0.5 if anomalous else 0.01, {}, "m"), 0.1, anomalous
    )


def noisy(rng: np.random.Generator) -> np.ndarray:
    return np.array([30.0, 2.0, 4.0]) + rng.normal(0.0, [0.05, 0.2, 0.03], size=(64, 3))


def step(screen: Screen, w: Window, anomalous: bool = False, alert_open: bool = False) -> tuple[bool, bool]:
    """One window through flag (and observe when sent): (sent, threshold may learn it)."""
    sent = screen.flag([w], busy=lambda d: alert_open)[0]
    learn = screen.observe(verdict(w, anomalous), alert_open) if sent else False
    return sent, learn


def screen(**kw: object) -> Screen:
    cfg = {"enabled": True, "z": 4.0, "every_k": 1000, "warmup": 32, "history": 64, **kw}
    return Screen(ScreenConfig.model_validate(cfg), period=1.0, stride=STRIDE, hold=12)


def decisions() -> dict[str, float]:
    return {
        s.labels["decision"]: s.value
        for s in metrics.SCREEN_WINDOWS.collect()[0].samples
        if s.name.endswith("_total")
    }


# -- arithmetic -----------------------------------------------------------------------------------
def test_features_are_std_range_and_slope_per_channel() -> None:
    t = np.arange(64, dtype=np.float64)
    data = np.stack([2.0 * t, np.where(t % 2 == 0, 1.0, -1.0), np.full(64, 4.0)], axis=1)
    f = screen().features([window("a", 1, data)])[0]
    std, rng, slope = f[0:3], f[3:6], f[6:9]
    np.testing.assert_allclose(std, [np.std(2.0 * t), 1.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(rng, [126.0, 2.0, 0.0])
    np.testing.assert_allclose(slope, [2.0, -32.0 / np.sum((t - 31.5) ** 2), 0.0], atol=1e-9)


def test_warmup_then_ordinary_windows_are_skipped_and_an_outlier_is_flagged() -> None:
    rng = np.random.default_rng(0)
    s = screen()
    before = decisions()
    sent = [step(s, window("a", i, noisy(rng)))[0] for i in range(1, 33)]
    assert all(sent), "every window of the warm-up goes to the autoencoder"
    assert s.warmed_up("a")
    ordinary = [step(s, window("a", i, noisy(rng)))[0] for i in range(33, 73)]
    assert sum(ordinary) <= 2, f"ordinary windows after the warm-up are skipped: {ordinary}"
    spike = noisy(rng)
    spike[40, 1] += 15.0  # one vibration burst
    assert step(s, window("a", 73, spike))[0], "a window with a burst is flagged"
    after = decisions()
    assert after.get("warmup", 0) - before.get("warmup", 0) == 32
    assert after.get("skipped", 0) - before.get("skipped", 0) >= 38
    assert after.get("flagged", 0) - before.get("flagged", 0) >= 1


def test_every_kth_window_is_scored_and_is_the_thresholds_only_sample() -> None:
    rng = np.random.default_rng(1)
    s = screen(every_k=4)
    learnt_in_warmup = [step(s, window("a", i, noisy(rng)))[1] for i in range(1, 33)]
    assert all(learnt_in_warmup), "warm-up windows are all learnt by the threshold (as without a screen)"
    flat = noisy(rng)
    results = {i: step(s, window("a", i, flat)) for i in range(33, 49)}  # identical windows: z = 0
    assert [i for i, (sent, _) in results.items() if sent] == [36, 40, 44, 48]
    assert all(learn for i, (sent, learn) in results.items() if sent)
    burst = flat.copy()
    burst[:, 2] += np.linspace(0.0, 3.0, 64)  # a pressure ramp: flagged, but not a uniform sample
    sent, learn = step(s, window("a", 49, burst))
    assert sent and not learn, "a flagged window does not enter the threshold baseline"


def test_an_anomalous_verdict_holds_the_device_for_open_n_windows() -> None:
    rng = np.random.default_rng(2)
    s = screen()
    flat = noisy(rng)
    for i in range(1, 33):
        step(s, window("a", i, flat))
    assert not step(s, window("a", 33, flat))[0]
    s.config = s.config.model_copy(update={"every_k": 34})  # make window 34 a sent one
    assert step(s, window("a", 34, flat), anomalous=True)[0]
    s.config = s.config.model_copy(update={"every_k": 1000})
    held = [step(s, window("a", i, flat))[0] for i in range(35, 35 + 12)]
    assert all(held), "the 12 windows after an anomalous verdict are all scored (k-of-n sees them)"
    assert not step(s, window("a", 47, flat))[0], "then the screen skips again"


def test_an_open_alert_keeps_every_window_on_the_autoencoder() -> None:
    rng = np.random.default_rng(3)
    s = screen()
    flat = noisy(rng)
    for i in range(1, 33):
        step(s, window("a", i, flat))
    count = s._devices["a"].count
    sent = [step(s, window("a", i, flat), alert_open=True) for i in range(33, 93)]
    assert all(x for x, _ in sent), "no window of a device with an open alert is skipped"
    assert s._devices["a"].count == count, "windows during an alert never enter the screen's history"
    after = [step(s, window("a", i, flat))[0] for i in range(93, 93 + 13)]
    assert all(after[:12]) and not after[12], "held for open_n windows after the alert closed"


def test_devices_are_screened_independently() -> None:
    rng = np.random.default_rng(4)
    s = screen()
    for i in range(1, 33):
        step(s, window("a", i, noisy(rng)))
    assert s.warmed_up("a") and not s.warmed_up("b")
    assert step(s, window("b", 33, noisy(rng)))[0], "device b is still warming up"
    assert step(s, window("a", 34, noisy(rng) * 0 + 99.0), anomalous=True)[0]  # a: an outlier, anomalous
    for i in range(35, 66):
        step(s, window("b", i, noisy(rng)))
    assert s.warmed_up("b")
    b_sent = [step(s, window("b", i, noisy(rng)))[0] for i in range(66, 76)]
    assert sum(b_sent) <= 1, "a's anomaly does not hold b"
    assert all(step(s, window("a", i, noisy(rng)))[0] for i in range(66, 76)), "a is still held"


def test_disabled_screen_sends_everything_and_learns_as_without_one() -> None:
    s = Screen(ScreenConfig(enabled=False), period=1.0, stride=STRIDE, hold=12)
    rng = np.random.default_rng(5)
    ws = [window("a", i, noisy(rng)) for i in range(1, 200)]
    assert s.flag(ws) == [True] * len(ws)
    assert all(s.observe(verdict(w), alert_open=False) for w in ws)
    assert make_screen(ScreenConfig(enabled=False), 1.0, STRIDE, 12, 1.0) is None


def test_screen_refuses_a_smoothed_threshold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ewma_alpha"):
        make_screen(ScreenConfig(enabled=True), 1.0, STRIDE, 12, 0.5)
    toml = f"""
[gateway]
id = "gw"
state_dir = "{tmp_path}"
[[sources]]
type = "serial"
name = "s"
port = "/dev/ttyUSB0"
[model]
path = "{MODEL}"
[threshold]
ewma_alpha = 0.5
[screen]
enabled = true
"""
    with pytest.raises(ConfigError, match="ewma_alpha"):
        parse_config(tomllib.loads(toml))
    config = parse_config(tomllib.loads(toml.replace("ewma_alpha = 0.5", "")))
    settings = StageSettings.from_config(config)
    assert settings.screen.enabled  # `edgewatch replay --config` carries the screen
    db = open_db(tmp_path / "c.db")
    try:
        assert build_pipeline(settings, load_bundle(MODEL), db, lambda e: None).screen is not None
        assert build_pipeline(PLAIN, load_bundle(MODEL), db, lambda e: None).screen is None
        # on by default, as docs/results.md measured: every 8th window, no feature test
        default = build_pipeline(StageSettings(), load_bundle(MODEL), db, lambda e: None).screen
        assert default is not None and default.config.every_k == 8 and np.isinf(default.config.z)
    finally:
        db.conn.close()
    # the default screen and a smoothed threshold: refused with the way out; accepted once it is off
    no_section = toml.replace("[screen]\nenabled = true\n", "")
    with pytest.raises(ConfigError, match=r"set \[screen\] enabled = false"):
        parse_config(tomllib.loads(no_section))
    off = parse_config(tomllib.loads(no_section + "[screen]\nenabled = false\n"))
    assert off.threshold.ewma_alpha == 0.5 and not off.screen.enabled
    db = open_db(tmp_path / "d.db")
    try:
        pipe = build_pipeline(StageSettings.from_config(off), load_bundle(MODEL), db, lambda e: None)
        assert pipe.screen is None
    finally:
        db.conn.close()


# -- the screened pipeline (real model, real SQLite) ---------------------------------------------
@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return load_bundle(MODEL)


@pytest.fixture(scope="module")
def bearing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("screen") / "bearing.csv"
    subprocess.run(
        [EDGEWATCH, "sim", "record", "--out", str(out), "--seed", "12", "--devices", "2",
         "--duration", "7200", "--scenario", "bearing_wear", "--fault-after", str(int(ONSET_S)),
         "--degradation", "2400"],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def run(
    bundle: Bundle, path: Path, db_path: Path, settings: StageSettings, install: Screen | None = None
) -> tuple[ReplayResult, Pipeline]:
    recs = read_recording(path, channels=bundle.manifest.channel_names)
    db = open_db(db_path)
    pipes: list[Pipeline] = []

    def factory(emit, on_judgement):  # type: ignore[no-untyped-def]
        pipe = build_pipeline(settings, bundle, db, emit, on_judgement=on_judgement)
        if install is not None:
            pipe.screen = install
        pipes.append(pipe)
        return pipe

    try:
        return replay(recs, factory), pipes[0]
    finally:
        db.conn.close()


def table(result: ReplayResult) -> list[tuple]:
    return [
        (j.score.device, j.score.end_ts, j.score.error, j.threshold, j.anomalous) for j in result.judgements
    ]


@pytest.mark.parametrize(
    "install",
    [
        Screen(ScreenConfig(enabled=False), 1.0, STRIDE, 12),
        Screen(ScreenConfig(enabled=True, every_k=1, warmup=16), 1.0, STRIDE, 12),
    ],
    ids=["disabled", "every_k_1"],
)
def test_a_screen_that_skips_nothing_changes_nothing(
    bundle: Bundle, bearing: Path, tmp_path: Path, install: Screen
) -> None:
    plain, _ = run(bundle, bearing, tmp_path / "a.db", PLAIN)
    screened, pipe = run(bundle, bearing, tmp_path / "b.db", StageSettings(), install)
    assert pipe.screen is install and pipe.stats.skipped_windows == 0
    assert table(screened) == table(plain) and len(plain.judgements) > 1000
    assert [e.payload for e in screened.events] == [e.payload for e in plain.events]
    assert plain.alert_spans()


def test_screened_pipeline_still_opens_the_alert_and_scores_every_window_while_open(
    bundle: Bundle, bearing: Path, tmp_path: Path
) -> None:
    plain, _ = run(bundle, bearing, tmp_path / "a.db", PLAIN)
    settings = StageSettings(screen=ScreenConfig(enabled=True, warmup=16, history=64))
    screened, pipe = run(bundle, bearing, tmp_path / "b.db", settings)
    total = len(plain.judgements)
    assert pipe.stats.skipped_windows > total * 0.3, "the screen really skipped windows"
    assert len(screened.judgements) + pipe.stats.skipped_windows == total

    onset = read_recording(bearing)[0].ts[0] + ONSET_S
    opened_plain = [s[1] for s in plain.alert_spans()["pump-01"]]
    spans = screened.alert_spans()
    assert set(spans) == {"pump-01"}, f"only the faulty pump alerts: {spans}"
    opened = [s[1] for s in spans["pump-01"]]
    assert all(t >= onset for t in opened)
    assert opened[0] - opened_plain[0] <= 8 * STRIDE * 12, "opened within ~12 min of the unscreened run"

    # while an alert is open, pump-01's windows are consecutive on the grid: none was skipped
    for _, start, end, _ in spans["pump-01"]:
        ends = [
            j.score.end_ts
            for j in screened.judgements
            if j.score.device == "pump-01" and start <= j.score.end_ts <= (end or np.inf)
        ]
        assert len(ends) > 10 and set(np.diff(ends)) == {float(STRIDE)}

    # a skipped window has no score row (nothing stored as 0 or NaN); scored ones are all there
    db = open_db(tmp_path / "b.db")
    try:
        n, low = db.execute("SELECT count(*), min(error) FROM scores").fetchone()
    finally:
        db.conn.close()
    assert n == len(screened.judgements) and low > 0.0


def test_screened_default_threshold_baseline_only_learns_the_uniform_sample(
    bundle: Bundle, bearing: Path, tmp_path: Path
) -> None:
    """With every_k = 4 the baseline fills ~4x slower than without a screen after the warm-up."""
    settings = StageSettings(
        screen=ScreenConfig(enabled=True, every_k=4, warmup=16, history=64),
        threshold=ThresholdConfig(history=100_000),
    )
    _, pipe = run(bundle, bearing, tmp_path / "b.db", settings)
    _, plain = run(
        bundle,
        bearing,
        tmp_path / "a.db",
        StageSettings(threshold=ThresholdConfig(history=100_000), screen=ScreenConfig(enabled=False)),
    )
    n_screened = min(pipe.thresholder._devices["pump-02"].count, 100_000)  # type: ignore[attr-defined]
    n_plain = plain.thresholder._devices["pump-02"].count  # type: ignore[attr-defined]
    assert 16 + (n_plain - 16) / 4 * 0.8 <= n_screened <= 16 + (n_plain - 16) / 4 * 1.2 + 12


# -- the measurement that chooses the default (training/screen_eval.py) ---------------------------
def _row(day: str, setting: str, cpu: float, detected: int, delay: float, fa: float = 0.0) -> dict:
    return {
        "day": day,
        "role": "tuning",
        "setting": setting,
        "cpu_s": cpu,
        "windows_scored": 100,
        "events": 5,
        "detected": detected,
        "median_time_to_detect_s": delay,
        "false_alerts_per_device_day": fa,
    }


def test_the_decision_rule_keeps_recall_and_delay_before_cpu() -> None:
    from training.screen_eval import SETTINGS, choose

    off, default, z3, z6, only_k = SETTINGS
    rows = [
        _row("d", off, 10.0, 5, 600.0),
        _row("d", default, 6.0, 5, 640.0),  # passes: 40 % saved, 6.7 % later
        _row("d", z3, 7.0, 5, 600.0),  # passes, saves less
        _row("d", z6, 4.0, 4, 600.0),  # cheapest, but loses an event
        _row("d", only_k, 5.0, 5, 900.0),  # detects 50 % later
    ]
    best, verdicts = choose(rows)
    assert best == default
    assert verdicts[z6].startswith("fails") and "4/5" in verdicts[z6]
    assert "median detection" in verdicts[only_k]
    assert verdicts[z3] == "passes, saves 30% CPU"
    # a false alert more, or too little saved, also fails; when nothing passes the screen stays off
    rows[1] = _row("d", default, 6.0, 5, 640.0, fa=1.0)
    rows[2] = _row("d", z3, 9.5, 5, 600.0)
    best, verdicts = choose(rows)
    assert best == off and "false alerts" in verdicts[default] and "< 10%" in verdicts[z3]


def test_screen_eval_replays_each_setting_through_the_product(tmp_path: Path) -> None:
    from training.screen_eval import SETTINGS, run_screen_eval

    res = run_screen_eval(MODEL, tmp_path / "data", hours=0.4, repeats=1, out=tmp_path / "out")
    rows = res["rows"]
    assert len(rows) == 4 * len(SETTINGS)
    off = [r for r in rows if r["setting"] == next(iter(SETTINGS))]
    for r in rows:
        base = next(b for b in off if b["day"] == r["day"])
        assert 0 < r["windows_scored"] <= base["windows_scored"] and r["cpu_s"] > 0
    # without a feature test only warm-up and every-8th windows are scored: fewer than without a screen
    only_k = [r for r in rows if r["setting"].startswith("every 8th only")]
    assert any(r["windows_scored"] < b["windows_scored"] for r, b in zip(only_k, off, strict=True))
    assert (tmp_path / "out" / "screen.md").read_text().count("\n| ") == len(rows) + 1
    assert res["chosen"] in SETTINGS


def test_without_a_feature_test_decisions_do_not_depend_on_when_the_screen_started() -> None:
    """z = inf (the default): no warm-up, so a screen started mid-stream (an agent restart) scores
    exactly the windows the screen that saw everything scores: the every-k grid and the holds."""
    rng = np.random.default_rng(7)
    ws = [window("a", i, noisy(rng)) for i in range(1, 121)]
    anomalous = {40, 41, 42}  # a short anomalous run: each verdict holds the device for 12 windows

    def decisions(s: Screen, part: list[Window]) -> list[bool]:
        out = []
        for w in part:
            sent, _ = step(s, w, anomalous=int(w.end_ts) // STRIDE in anomalous)
            out.append(sent)
        return out

    cfg = {"z": float("inf"), "every_k": 8}
    whole = decisions(screen(**cfg), ws)
    restarted = decisions(screen(**cfg), ws[60:])
    assert whole[60:] == restarted
    assert whole[:8] == [i % 8 == 0 for i in range(1, 9)], "no warm-up: only every 8th from the start"
    # window 40 (every 8th) is scored and anomalous; 41 and 42 are held, scored, anomalous; the hold of
    # 12 windows after 42 keeps 43-54 on the model; 55 is skipped again
    assert all(whole[i - 1] for i in range(40, 55)) and not whole[55 - 1]


def test_screen_eval_refuses_bad_arguments_clearly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from agent.cli import main

    assert main(["eval", "screen", "--model", str(tmp_path / "none"), "--hours", "0.1"]) == 2
    assert "cannot use the model" in capsys.readouterr().err
    assert main(["eval", "screen", "--hours", "-1"]) == 2
    assert main(["eval", "screen", "--repeats", "0"]) == 2
    assert "--hours must be > 0" in capsys.readouterr().err
