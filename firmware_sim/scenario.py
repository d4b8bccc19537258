"""Scenarios: which machine and sensor faults hit which device, and when.

A scenario is only a schedule; `pump.py` turns it into signals. Keeping the schedule separate lets
tests and demos pick fault timings (`--fault-after`, `--degradation`) without touching the physics,
and lets the ground-truth labels come from the same numbers that drive the effects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

MACHINE_FAULTS = ("bearing_wear", "cavitation", "seal_leak", "cooling_failure", "imbalance")
SENSOR_FAULTS = ("stuck", "dropout", "spikes", "nan", "garbage", "drift")
CHANNELS = ("temperature", "vibration", "pressure")

# The channel a single-sensor-fault scenario corrupts (dropout and garbage hit the whole reading).
DEFAULT_SENSOR_CHANNEL = {
    "stuck": "vibration",
    "spikes": "pressure",
    "nan": "temperature",
    "drift": "temperature",
    "dropout": "*",
    "garbage": "*",
}


@dataclass(frozen=True)
class MachineFault:
    """A progressive machine fault: `degrading` from `start` for `degradation` s, then `failed`."""

    device: int  # device index (0 = pump-01)
    kind: str  # one of MACHINE_FAULTS
    start: float  # sim seconds after the recording start
    degradation: float  # seconds of the degrading phase; failure at start + degradation
    repair_after: float | None = None  # seconds spent failed before a repair restores normal


@dataclass(frozen=True)
class SensorFault:
    """A sensor or link fault over [start, start + duration); the machine itself is unaffected."""

    device: int
    kind: str  # one of SENSOR_FAULTS
    channel: str  # one of CHANNELS, or "*" for whole-reading faults (dropout, garbage)
    start: float
    duration: float


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    machine_faults: tuple[MachineFault, ...] = ()
    sensor_faults: tuple[SensorFault, ...] = ()

    def machine_faults_of(self, device: int) -> tuple[MachineFault, ...]:
        return tuple(f for f in self.machine_faults if f.device == device)

    def sensor_faults_of(self, device: int) -> tuple[SensorFault, ...]:
        return tuple(f for f in self.sensor_faults if f.device == device)

    def repeated(self, period: float, times: int) -> Scenario:
        """The schedule again every `period` s, `times` times in all: an endless `mixed` stream keeps
        showing faults. Only sensible for schedules that end healthy (repaired) within `period`."""
        return replace(
            self,
            machine_faults=tuple(
                replace(f, start=f.start + i * period) for i in range(times) for f in self.machine_faults
            ),
            sensor_faults=tuple(
                replace(f, start=f.start + i * period) for i in range(times) for f in self.sensor_faults
            ),
        )


Builder = Callable[[int, float, float | None, float | None, int], Scenario]

DESCRIPTIONS: dict[str, str] = {
    "normal": "healthy pumps only: duty cycles, load changes, ambient cycle; no faults (training data)",
    "mixed": "every machine fault across devices and time (with repairs), plus some sensor faults",
    "bearing_wear": "pump-01: rising vibration with growing impact bursts, bearing temperature follows",
    "cavitation": "pump-01: discharge pressure drops and fluctuates, broadband vibration, worst at high load",
    "seal_leak": "pump-01: pressure lower at equal load and sagging during each run",
    "cooling_failure": "pump-01: temperature rise over ambient grows for the same load",
    "imbalance": "pump-01: vibration steps up at onset (scales with speed^2) and keeps growing",
    "sensor_stuck": "pump-01: vibration sensor frozen at one value",
    "sensor_dropout": "pump-01: silence, no readings at all",
    "sensor_spikes": "pump-01: isolated large spikes on pressure",
    "sensor_nan": "pump-01: temperature sensor intermittently reports nan",
    "sensor_garbage": "pump-01: intermittent corrupted / non-ASCII lines on the wire",
    "sensor_drift": "pump-01: temperature calibration drifts upward, recalibrated at the end",
    "sensor_faults": "pump-01: every sensor fault in turn, one after another",
}


def _single_machine(kind: str) -> Builder:
    def build(
        devices: int, horizon: float, fault_after: float | None, degradation: float | None, seed: int
    ) -> Scenario:
        start = 0.25 * horizon if fault_after is None else fault_after
        deg = 0.5 * horizon if degradation is None else degradation
        return Scenario(kind, DESCRIPTIONS[kind], machine_faults=(MachineFault(0, kind, start, deg),))

    return build


def _single_sensor(kind: str) -> Builder:
    name = f"sensor_{kind}"

    def build(
        devices: int, horizon: float, fault_after: float | None, degradation: float | None, seed: int
    ) -> Scenario:
        start = 0.25 * horizon if fault_after is None else fault_after
        dur = 0.5 * horizon if degradation is None else degradation
        fault = SensorFault(0, kind, DEFAULT_SENSOR_CHANNEL[kind], start, dur)
        return Scenario(name, DESCRIPTIONS[name], sensor_faults=(fault,))

    return build


def _normal(
    devices: int, horizon: float, fault_after: float | None, degradation: float | None, seed: int
) -> Scenario:
    return Scenario("normal", DESCRIPTIONS["normal"])


def _sensor_faults(
    devices: int, horizon: float, fault_after: float | None, degradation: float | None, seed: int
) -> Scenario:
    """All sensor faults on pump-01, back to back in equal slots after `fault_after`."""
    start = 0.1 * horizon if fault_after is None else fault_after
    slot = max(horizon - start, 1.0) / len(SENSOR_FAULTS)
    dur = 0.6 * slot if degradation is None else min(degradation, slot)
    faults = tuple(
        SensorFault(0, kind, DEFAULT_SENSOR_CHANNEL[kind], start + i * slot, dur)
        for i, kind in enumerate(SENSOR_FAULTS)
    )
    return Scenario("sensor_faults", DESCRIPTIONS["sensor_faults"], sensor_faults=faults)


def _mixed(
    devices: int, horizon: float, fault_after: float | None, degradation: float | None, seed: int
) -> Scenario:
    """Machine faults round-robin over devices, each in its own time slot, staggered per device.

    Each fault degrades, fails, stays failed for a while and is repaired, so one device can show
    several faults in a recording. Sensor faults land at random (seeded) places, two per device.
    """
    per_device: dict[int, list[str]] = {d: [] for d in range(devices)}
    for i, kind in enumerate(MACHINE_FAULTS):
        per_device[i % devices].append(kind)
    machine: list[MachineFault] = []
    for d, kinds in per_device.items():
        if not kinds:
            continue
        slot = horizon / len(kinds)
        for j, kind in enumerate(kinds):
            offset = (0.1 + 0.1 * (d % 3)) * slot if fault_after is None else fault_after
            deg = 0.45 * slot if degradation is None else degradation
            failed_for = max(0.1 * slot, 0.2 * deg)
            machine.append(MachineFault(d, kind, j * slot + offset, deg, repair_after=failed_for))
    rng = np.random.default_rng([seed, 0x5EED, devices])
    sensor: list[SensorFault] = []
    for d in range(devices):
        kinds = rng.choice(len(SENSOR_FAULTS), size=2, replace=False)
        for j, k in enumerate(kinds):
            kind = SENSOR_FAULTS[int(k)]
            half = horizon / 2
            dur = float(min(rng.uniform(600, 2400), 0.05 * horizon))
            start = j * half + float(rng.uniform(0.1, 0.9)) * (half - dur)
            channel = DEFAULT_SENSOR_CHANNEL[kind]
            if channel != "*":
                channel = CHANNELS[int(rng.integers(len(CHANNELS)))]
            sensor.append(SensorFault(d, kind, channel, start, dur))
    return Scenario("mixed", DESCRIPTIONS["mixed"], tuple(machine), tuple(sensor))


BUILDERS: dict[str, Builder] = {
    "normal": _normal,
    "mixed": _mixed,
    **{k: _single_machine(k) for k in MACHINE_FAULTS},
    **{f"sensor_{k}": _single_sensor(k) for k in SENSOR_FAULTS},
    "sensor_faults": _sensor_faults,
}


def build_scenario(
    name: str,
    devices: int,
    horizon: float,
    fault_after: float | None = None,
    degradation: float | None = None,
    seed: int = 0,
) -> Scenario:
    """Build a named scenario for `devices` pumps over `horizon` sim seconds.

    `fault_after` (s) moves the first fault's onset; `degradation` (s) sets the degrading phase of
    machine faults (for sensor-fault scenarios: how long the sensor fault lasts). Defaults scale with
    the horizon so any recording length shows the whole story.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown scenario {name!r}; known: {', '.join(BUILDERS)}")
    if devices < 1:
        raise ValueError("devices must be >= 1")
    if horizon <= 0:
        raise ValueError("horizon must be > 0 seconds")
    if fault_after is not None and fault_after < 0:
        raise ValueError("fault_after must be >= 0 seconds")
    if degradation is not None and degradation <= 0:
        raise ValueError("degradation must be > 0 seconds")
    return BUILDERS[name](devices, horizon, fault_after, degradation, seed)
