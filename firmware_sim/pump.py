"""Physics-like centrifugal pump with motor: temperature, vibration, pressure plus ground truth.

Signals are generated in fixed blocks of BLOCK samples with numpy. Randomness comes from one
generator per (seed, device, block index, stream), and the only state carried between blocks is a
handful of filter states and the duty-cycle schedule. So the numbers depend on the seed, the start
time, the rate and the scenario, never on how a caller slices the time range: a recording and a
live stream of the same seed and start send exactly the same values.

Model (per device, nominal parameters drawn from the seed):
- duty cycle: run periods (hours) and stops (minutes); during a run the load setpoint changes every
  tens of minutes, a little higher in the daytime. Motor speed follows the setpoint (first-order lag).
- pressure: suction head + gain * speed^2 (pump affinity law) + pulsation noise.
- vibration: idle floor + base * (0.3 + 0.7 speed^2), multiplicative noise and slow wander.
- temperature: first-order lag (tens of minutes) towards ambient + rise * speed^1.5; ambient has a
  daily cycle and slow weather wander.
Faults change these relations progressively (severity = progress^2, so onset is subtle).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from firmware_sim.scenario import MachineFault, Scenario, SensorFault

MACHINE_STATES = ("normal", "degrading", "failed")
FAULTS = ("", "bearing_wear", "cavitation", "seal_leak", "cooling_failure", "imbalance")
SENSOR_FAULT_LABELS = ("", "stuck", "dropout", "spikes", "nan", "garbage", "drift")
# What goes on the wire for a reading.
WIRE_OK, WIRE_DROPOUT, WIRE_GARBAGE = 0, 1, 2
# Sensor resolution (decimals): values are rounded here so files and wire carry identical numbers.
DECIMALS = {"temperature": 2, "vibration": 3, "pressure": 3}
BLOCK = 4096
DAY = 86400.0


def device_name(index: int) -> str:
    return f"pump-{index + 1:02d}"


@dataclass(frozen=True)
class PumpParams:
    """Nominal parameters of one pump installation (drawn from seed and device index)."""

    p_suction: float  # bar, pressure with the pump stopped
    p_gain: float  # bar at full speed above suction
    v_idle: float  # mm/s, background vibration while stopped
    v_base: float  # mm/s at full speed, healthy
    amb_mean: float  # degC
    amb_amp: float  # degC, half the daily swing
    amb_peak_hour: float  # hour of day (UTC) of the warmest ambient
    t_rise: float  # degC above ambient at full speed, steady state
    tau_thermal: float  # s
    tau_speed: float  # s
    run_mean: float  # s, mean run period
    stop_mean: float  # s, mean stop period
    load_change_mean: float  # s, mean time between setpoint changes
    load_lo: float  # lowest running load (fraction of rated speed)
    load_hi: float
    noise_t: float  # degC
    noise_v: float  # relative
    noise_p: float  # bar


def device_params(seed: int, device: int) -> PumpParams:
    """Draw one installation's nominal parameters, so two devices (or seeds) look different."""
    r = np.random.default_rng([seed, device, 0xA11])
    u = r.uniform
    return PumpParams(
        p_suction=u(0.25, 0.4),
        p_gain=u(4.35, 4.75),
        v_idle=u(0.05, 0.12),
        v_base=u(1.8, 2.3),
        amb_mean=u(19.0, 25.0),
        amb_amp=u(3.0, 5.5),
        amb_peak_hour=u(13.5, 16.5),
        t_rise=u(16.0, 20.0),
        tau_thermal=u(1000.0, 1400.0),
        tau_speed=u(5.0, 12.0),
        run_mean=u(2.0, 4.5) * 3600,
        stop_mean=u(12.0, 40.0) * 60,
        load_change_mean=u(12.0, 40.0) * 60,
        load_lo=u(0.74, 0.8),
        load_hi=u(0.95, 1.0),
        noise_t=u(0.03, 0.06),
        noise_v=u(0.05, 0.09),
        noise_p=u(0.012, 0.025),
    )


@dataclass
class Chunk:
    """Consecutive readings of one device. Label arrays hold indices into the label tuples above."""

    device: str
    seq: np.ndarray  # int64, sample index (wraps at 2^32 on the wire)
    ts_ms: np.ndarray  # int64, device clock, ms since the Unix epoch
    temperature: np.ndarray  # float64; NaN = sensor sent nan, or nothing valid was sent (see wire)
    vibration: np.ndarray
    pressure: np.ndarray
    machine_state: np.ndarray  # int8 -> MACHINE_STATES
    fault: np.ndarray  # int8 -> FAULTS
    sensor_fault: np.ndarray  # int8 -> SENSOR_FAULT_LABELS
    wire: np.ndarray  # int8: WIRE_OK, WIRE_DROPOUT (nothing sent), WIRE_GARBAGE (corrupt line sent)

    def __len__(self) -> int:
        return len(self.ts_ms)

    def channel(self, name: str) -> np.ndarray:
        return getattr(self, name)

    def slice(self, a: int, b: int) -> Chunk:
        return Chunk(self.device, *(getattr(self, f)[a:b] for f in _ARRAY_FIELDS))  # type: ignore[arg-type]

    @staticmethod
    def concat(chunks: list[Chunk]) -> Chunk:
        return Chunk(
            chunks[0].device, *(np.concatenate([getattr(c, f) for c in chunks]) for f in _ARRAY_FIELDS)
        )  # type: ignore[arg-type]


_ARRAY_FIELDS = (
    "seq",
    "ts_ms",
    "temperature",
    "vibration",
    "pressure",
    "machine_state",
    "fault",
    "sensor_fault",
    "wire",
)


def first_order_lag(u: np.ndarray, alpha: float, y0: float) -> tuple[np.ndarray, float]:
    """y[k] = alpha*y[k-1] + (1-alpha)*u[k], vectorised.

    Closed form y[j] = alpha^j (y0 + (1-alpha) sum_i u_i alpha^-i), evaluated in sub-blocks short
    enough that alpha^-n stays below e^15, so precision stays near 1e-9 relative.
    """
    n = len(u)
    out = np.empty(n)
    if n == 0:
        return out, y0
    step = max(1, int(15.0 / max(-math.log(alpha), 1e-12)))
    for s in range(0, n, step):
        seg = u[s : s + step]
        p = alpha ** np.arange(1, len(seg) + 1)
        y = p * (y0 + (1.0 - alpha) * np.cumsum(seg / p))
        out[s : s + len(seg)] = y
        y0 = float(y[-1])
    return out, y0


class _DutySchedule:
    """Lazily drawn piecewise-constant load setpoint (0 = stopped), consumed in time order."""

    def __init__(self, params: PumpParams, seed: int, device: int, start_s: float) -> None:
        self.p = params
        self.rng = np.random.default_rng([seed, device, 0xD07])
        self.start_s = start_s  # epoch seconds of t=0, for the daytime load bump
        self.starts: list[float] = []
        self.loads: list[float] = []
        self._gen = self._segments()

    def _load(self, t: float) -> float:
        hour = ((self.start_s + t) % DAY) / 3600.0
        day_bump = 0.04 * math.cos(2 * math.pi * (hour - 14.0) / 24.0)
        lo, hi = self.p.load_lo, self.p.load_hi
        return float(np.clip(self.rng.uniform(lo, hi) + day_bump, lo - 0.04, 1.0))

    def _segments(self) -> Iterator[tuple[float, float]]:
        t = 0.0
        first = True
        while True:
            run = self.rng.exponential(self.p.run_mean)
            run = max(run, 900.0) if not first else max(run, 1800.0)
            first = False
            end = t + run
            while t < end:
                yield t, self._load(t)
                t += max(120.0, self.rng.exponential(self.p.load_change_mean))
            t = end
            yield t, 0.0
            t += max(180.0, self.rng.exponential(self.p.stop_mean))

    def setpoint(self, t: np.ndarray) -> np.ndarray:
        """Setpoint at times t (sorted, not before the last call's first time)."""
        while not self.starts or self.starts[-1] <= t[-1]:
            a, b = next(self._gen)
            self.starts.append(a)
            self.loads.append(b)
        idx = np.searchsorted(np.asarray(self.starts), t, side="right") - 1
        out = np.asarray(self.loads)[idx]
        # Drop segments that ended before this block; keep the one in force at t[-1].
        keep = max(0, int(idx[-1]))
        del self.starts[:keep], self.loads[:keep]
        return out


def _fault_end(f: MachineFault) -> float:
    """When the machine is healthy again (repaired), or never."""
    return math.inf if f.repair_after is None else f.start + f.degradation + f.repair_after


def _severity(t: np.ndarray, f: MachineFault) -> tuple[np.ndarray, np.ndarray]:
    """Severity in [0, 1] (progress^2: a subtle start) and state code per sample for one fault."""
    prog = (t - f.start) / f.degradation
    sev = np.clip(prog, 0.0, 1.0) ** 2
    state = np.where(prog < 0, 0, np.where(prog < 1, 1, 2)).astype(np.int8)
    if f.repair_after is not None:
        repaired = t >= f.start + f.degradation + f.repair_after
        sev[repaired] = 0.0
        state[repaired] = 0
    sev[prog < 0] = 0.0
    return sev, state


def _ar_noise(rng: np.random.Generator, n: int, alpha: float, y0: float) -> tuple[np.ndarray, float]:
    """Unit-variance AR(1) noise (slow wander), continuing from y0."""
    gain = math.sqrt((1 + alpha) / (1 - alpha))
    y, last = first_order_lag(rng.standard_normal(n) * gain, alpha, y0)
    return y, last


class PumpSim:
    """One device's simulator; `next_block()` returns the next BLOCK samples."""

    def __init__(
        self,
        seed: int,
        device: int,
        scenario: Scenario,
        start_ms: int,
        rate: float = 1.0,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0 Hz")
        self.seed, self.device, self.rate, self.start_ms = seed, device, rate, start_ms
        self.name = device_name(device)
        self.p = device_params(seed, device)
        self.machine_faults: tuple[MachineFault, ...] = scenario.machine_faults_of(device)
        self.sensor_faults: tuple[SensorFault, ...] = scenario.sensor_faults_of(device)
        self.dt = 1.0 / rate
        self.k = 0  # next sample index
        self.block_index = 0
        self.schedule = _DutySchedule(self.p, seed, device, start_ms / 1000.0)
        first = self.schedule.setpoint(np.zeros(1))[0]
        amb0 = self._ambient_cycle(np.zeros(1))[0]
        self.s_speed = first
        self.s_temp = amb0 + self.p.t_rise * first**1.5
        self.s_run = 1.0 if first > 0 else 0.0
        self.s_wander = {"amb": 0.0, "t": 0.0, "v": 0.0, "p": 0.0, "leak": 0.0}
        self.stuck: dict[int, float] = {}  # sensor-fault index -> frozen value

    def _ambient_cycle(self, t: np.ndarray) -> np.ndarray:
        hour = ((self.start_ms / 1000.0 + t) % DAY) / 3600.0
        return self.p.amb_mean + self.p.amb_amp * np.cos(2 * np.pi * (hour - self.p.amb_peak_hour) / 24.0)

    def _alpha(self, tau: float) -> float:
        return math.exp(-self.dt / tau)

    def next_block(self) -> Chunk:
        n = BLOCK
        k = self.k + np.arange(n, dtype=np.int64)
        t = k * self.dt
        rng = np.random.default_rng([self.seed, self.device, self.block_index, 0xB10C])
        p = self.p
        w = self.s_wander

        # Operating point.
        target = self.schedule.setpoint(t)
        speed, self.s_speed = first_order_lag(target, self._alpha(p.tau_speed), self.s_speed)
        speed = np.maximum(speed, 0.0)
        running = (speed > 0.05).astype(float)
        run_age, self.s_run = first_order_lag(running, self._alpha(600.0), self.s_run)

        # Fault severities (zero when no such fault).
        sev = {kind: np.zeros(n) for kind in FAULTS[1:]}
        state = np.zeros(n, dtype=np.int8)
        fault = np.zeros(n, dtype=np.int8)
        for f in self._machine_faults_in(t[0], t[-1]):
            s, st = _severity(t, f)
            sev[f.kind] = np.maximum(sev[f.kind], s)
            active = st > 0
            state = np.where(active, np.maximum(state, st), state)
            fault = np.where(active, np.int8(FAULTS.index(f.kind)), fault)

        # Ambient and temperature (first-order thermal lag).
        amb_w, w["amb"] = _ar_noise(rng, n, self._alpha(3 * 3600.0), w["amb"])
        ambient = self._ambient_cycle(t) + 0.8 * amb_w
        rise = p.t_rise * speed**1.5 * (1.0 + 1.6 * sev["cooling_failure"])
        rise += speed * (11.0 * sev["bearing_wear"] + 1.5 * sev["seal_leak"])
        temp, self.s_temp = first_order_lag(ambient + rise, self._alpha(p.tau_thermal), self.s_temp)
        t_w, w["t"] = _ar_noise(rng, n, self._alpha(120.0), w["t"])
        temperature = temp + 0.06 * t_w + p.noise_t * rng.standard_normal(n)

        # Pressure: affinity law, minus seal leak and cavitation losses.
        cav = sev["cavitation"] * np.clip((speed - 0.6) / 0.4, 0.0, 1.0) ** 1.5
        leak = sev["seal_leak"] * (0.15 + 0.25 * run_age) * running
        p_dyn = p.p_gain * speed**2 * (1.0 - leak)
        cav_fluct = np.abs(rng.standard_normal(n))
        p_w, w["p"] = _ar_noise(rng, n, self._alpha(30.0), w["p"])
        pressure = (
            p.p_suction
            + p_dyn
            - cav * (0.9 + 0.35 * cav_fluct)
            + (p.noise_p + 0.05 * sev["cavitation"] * running) * rng.standard_normal(n)
            + 0.02 * speed * p_w
        )
        # A worn seal leaks unsteadily: pressure jitters for seconds at a time. Its own generator, so
        # the streams above (and every `normal` recording) stay exactly what they were.
        extra = np.random.default_rng([self.seed, self.device, self.block_index, 0x5EA1])
        sl = sev["seal_leak"] * running
        leak_w, w["leak"] = _ar_noise(extra, n, self._alpha(6.0), w["leak"])
        spurt_p = np.minimum(1.0, 0.03 * sl * self.dt)  # about one spurt per 30 s at full severity
        spurts = (extra.random(n) < spurt_p) * extra.uniform(0.5, 1.5, n) * sl
        kernel = np.exp(-np.arange(int(40 * self.rate) + 1) / (8.0 * self.rate))
        pressure -= np.convolve(spurts, kernel)[:n] + 0.0
        pressure += 0.25 * sl * leak_w

        # Vibration: healthy level ~ speed^2, multiplicative noise, plus fault components.
        v_w, w["v"] = _ar_noise(rng, n, self._alpha(60.0), w["v"])
        healthy = p.v_idle + p.v_base * (0.3 + 0.7 * speed**2) * running
        vib = healthy * np.exp(p.noise_v * rng.standard_normal(n) + 0.05 * v_w)
        bw = sev["bearing_wear"]
        burst_p = np.minimum(1.0, (0.002 + 0.05 * bw) * self.dt)  # impacts per second, whatever the rate
        bursts = (rng.random(n) < burst_p) * running * (bw > 0)
        amp = speed * (0.4 + 7.0 * bw) * rng.exponential(1.0, n) * bursts
        amp = np.convolve(amp, [1.0, 0.55, 0.3, 0.15])[:n]
        vib += speed * 2.6 * bw + amp
        broadband = 3.2 * cav * (0.6 + 0.8 * rng.random(n))
        vib = np.sqrt(vib**2 + broadband**2)
        imb_on = (sev["imbalance"] > 0) | self._imbalance_started(t)
        vib += speed**2 * imb_on * (0.9 + 3.5 * sev["imbalance"])

        values = {"temperature": temperature, "vibration": vib, "pressure": pressure}
        sensor, wire = self._apply_sensor_faults(t, values, rng)
        for ch, dec in DECIMALS.items():
            values[ch] = np.round(values[ch], dec) + 0.0  # + 0.0 turns -0.0 into 0.0
            values[ch][wire != WIRE_OK] = np.nan

        ts_ms = self.start_ms + np.rint(k * (1000.0 / self.rate)).astype(np.int64)
        chunk = Chunk(
            self.name,
            k,
            ts_ms,
            values["temperature"],
            values["vibration"],
            values["pressure"],
            state,
            fault,
            sensor,
            wire,
        )
        self.k += n
        self.block_index += 1
        return chunk

    def _imbalance_started(self, t: np.ndarray) -> np.ndarray:
        """Imbalance is a step: on from onset even while severity is still ~0 (until repaired)."""
        on = np.zeros(len(t), dtype=bool)
        for f in self._machine_faults_in(t[0], t[-1]):
            if f.kind == "imbalance":
                on |= (t >= f.start) & (t < _fault_end(f))
        return on

    def _machine_faults_in(self, t0: float, t1: float) -> list[MachineFault]:
        """Faults that matter in [t0, t1]: started by t1 and not repaired before t0."""
        return [f for f in self.machine_faults if f.start <= t1 and _fault_end(f) > t0]

    def _apply_sensor_faults(
        self, t: np.ndarray, values: dict[str, np.ndarray], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        n = len(t)
        label = np.zeros(n, dtype=np.int8)
        wire = np.zeros(n, dtype=np.int8)
        draw = rng.random(n)  # one shared draw keeps the RNG stream independent of the scenario
        spike = rng.uniform(4.0, 12.0, n) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
        for i, f in enumerate(self.sensor_faults):
            if f.start > t[-1] or f.start + f.duration <= t[0]:
                continue
            inside = (t >= f.start) & (t < f.start + f.duration)
            if not inside.any():
                continue
            label[inside] = SENSOR_FAULT_LABELS.index(f.kind)
            if f.kind == "dropout":
                wire[inside] = WIRE_DROPOUT
            elif f.kind == "garbage":
                wire[inside & (draw < 0.4)] = WIRE_GARBAGE
            else:
                v = values[f.channel]
                if f.kind == "stuck":
                    if i not in self.stuck:
                        self.stuck[i] = round(float(v[np.argmax(inside)]), DECIMALS[f.channel])
                    v[inside] = self.stuck[i]
                elif f.kind == "nan":
                    v[inside & (draw < 0.5)] = np.nan
                elif f.kind == "spikes":
                    hit = inside & (draw < 0.03)
                    scale = {"temperature": 4.0, "vibration": 2.0, "pressure": 0.4}[f.channel]
                    mag = spike[hit] * scale
                    if f.channel == "vibration":
                        mag = np.abs(mag)
                    v[hit] += mag
                elif f.kind == "drift":
                    total = {"temperature": 6.0, "vibration": 1.5, "pressure": 0.8}[f.channel]
                    v[inside] += total * (t[inside] - f.start) / f.duration
        return label, wire


def blocks(
    seed: int, devices: int, scenario: Scenario, start_ms: int, rate: float = 1.0
) -> Iterator[list[Chunk]]:
    """Endless lockstep blocks for all devices: one Chunk per device per step."""
    sims = [PumpSim(seed, d, scenario, start_ms, rate) for d in range(devices)]
    while True:
        yield [s.next_block() for s in sims]


def fleet(
    seed: int,
    devices: int,
    scenario: Scenario,
    start_ms: int,
    rate: float = 1.0,
    duration: float | None = None,
) -> Iterator[list[Chunk]]:
    """Blocks for all devices, cut at `duration` sim seconds (None = endless)."""
    total = None if duration is None else round(duration * rate)
    done = 0
    for group in blocks(seed, devices, scenario, start_ms, rate):
        if total is not None and done + BLOCK >= total:
            yield [c.slice(0, total - done) for c in group]
            return
        done += BLOCK
        yield group


def simulate(
    seed: int,
    device: int,
    scenario: Scenario,
    start_ms: int,
    duration: float,
    rate: float = 1.0,
) -> Chunk:
    """All readings of one device over [start, start + duration) as arrays."""
    sim = PumpSim(seed, device, scenario, start_ms, rate)
    total = round(duration * rate)
    parts: list[Chunk] = []
    got = 0
    while got < total:
        c = sim.next_block()
        parts.append(c.slice(0, min(len(c), total - got)))
        got += len(parts[-1])
    return Chunk.concat(parts)
