"""Sources: where raw sensor messages come from (a serial port, an MQTT broker; replay is another).

A source owns its I/O thread and hands every raw line or payload, untouched, to a sink
(`RawMessage`); parsing happens downstream so that every source is decoded and counted the same way.
Sources survive their transport going away: a serial adapter unplugged and plugged back, a broker
restarted. They log the first failure and the recovery, not every retry.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Annotated, Literal, Protocol, runtime_checkable

import paho.mqtt.client as mqtt
import serial
from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.mqtt_client import MqttConnectionConfig, make_client
from agent.parse import MAX_LINE_BYTES
from agent.types import RawMessage

log = logging.getLogger(__name__)

Sink = Callable[[RawMessage], None]


@runtime_checkable
class Source(Protocol):
    """Anything that produces RawMessages on its own thread until stopped."""

    name: str

    def start(self, sink: Sink) -> None: ...

    def stop(self) -> None: ...


class SerialSourceConfig(BaseModel):
    """Sensor firmware on a serial port (USB adapter or UART), protocol EW1 lines."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["serial"] = Field(description='Source kind: "serial".')
    name: str = Field(
        "", description="Unique name of this source, for logs and metrics. Default: serial:<port>."
    )
    port: str = Field(
        min_length=1,
        description="Serial device path. Prefer a stable /dev/serial/by-id/... link over /dev/ttyUSB0, "
        "whose number can change when the adapter is re-plugged.",
    )
    baudrate: int = Field(115200, gt=0, description="Line speed in baud (the protocol uses 115200, 8N1).")
    read_timeout_s: float = Field(
        0.5, gt=0, le=10, description="Read timeout; bounds how long stop() waits for the reader thread."
    )
    reopen_min_s: float = Field(0.5, gt=0, description="First delay before reopening a lost port (doubles).")
    reopen_max_s: float = Field(10.0, gt=0, description="Longest delay between reopen attempts.")

    @model_validator(mode="after")
    def _defaults(self) -> SerialSourceConfig:
        if not self.name:
            self.name = f"serial:{self.port}"
        if self.reopen_max_s < self.reopen_min_s:
            raise ValueError("reopen_max_s must be >= reopen_min_s")
        return self


class MqttSourceConfig(BaseModel):
    """Sensor firmware publishing JSON telemetry to an MQTT broker (usually one on the gateway)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["mqtt"] = Field(description='Source kind: "mqtt".')
    name: str = Field(
        "", description="Unique name of this source, for logs and metrics. Default: mqtt:<host>."
    )
    mqtt: MqttConnectionConfig = Field(
        default_factory=MqttConnectionConfig, description="Broker connection (see [uplink.mqtt] for keys)."
    )
    topic_prefix: str = Field(
        "edgewatch/sensors",
        min_length=1,
        description="Telemetry is read from <topic_prefix>/<device>/telemetry (subscription <prefix>/+/telemetry).",
    )
    qos: Literal[0, 1] = Field(
        1, description="Subscription QoS. 1 lets the broker queue readings while we are away."
    )
    client_id: str | None = Field(
        None,
        description="Fixed MQTT client id, which keeps the persistent session across restarts. Default: "
        "edgewatch-<gateway id>-<source name>.",
    )

    @model_validator(mode="after")
    def _defaults(self) -> MqttSourceConfig:
        if not self.name:
            self.name = f"mqtt:{self.mqtt.host}"
        if any(ch in self.topic_prefix for ch in "+#") or self.topic_prefix.endswith("/"):
            raise ValueError("topic_prefix must be a plain topic (no wildcards, no trailing '/')")
        return self

    @property
    def topic(self) -> str:
        return f"{self.topic_prefix}/+/telemetry"


SourceConfig = Annotated[SerialSourceConfig | MqttSourceConfig, Field(discriminator="type")]


class SerialSource:
    """Reads EW1 lines from a serial port on a thread; reopens the port whenever it goes away."""

    def __init__(self, config: SerialSourceConfig) -> None:
        self.config = config
        self.name = config.name
        self.lines = 0  # lines handed to the sink (tests and status)
        self.opens = 0  # successful opens (1 + reconnects)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._port: serial.Serial | None = None

    @property
    def connected(self) -> bool:
        return self._port is not None

    def start(self, sink: Sink) -> None:
        if self._thread is not None:
            raise RuntimeError(f"source {self.name} already started")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, args=(sink,), name=f"source-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.config.read_timeout_s + 5)
            self._thread = None

    def _open(self) -> serial.Serial:
        return serial.Serial(self.config.port, self.config.baudrate, timeout=self.config.read_timeout_s)

    def _run(self, sink: Sink) -> None:
        delay = self.config.reopen_min_s
        failing_since: float | None = None
        while not self._stop.is_set():
            try:
                self._port = self._open()
            except (serial.SerialException, OSError) as e:
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning(
                        "serial port %s unavailable (%s); retrying until it is back", self.config.port, e
                    )
                self._stop.wait(delay)
                delay = min(delay * 2, self.config.reopen_max_s)
                continue
            self.opens += 1
            if failing_since is not None:
                log.info(
                    "serial port %s back after %.1f s", self.config.port, time.monotonic() - failing_since
                )
            else:
                log.info("serial port %s open", self.config.port)
            failing_since = None
            delay = self.config.reopen_min_s
            try:
                self._read_lines(self._port, sink)
            except (serial.SerialException, OSError) as e:
                failing_since = time.monotonic()
                log.warning("serial port %s lost (%s); reopening", self.config.port, e)
            except Exception:  # a bug downstream (the sink) must not kill the reader for good
                log.exception("serial source %s: error handling a line; reopening the port", self.name)
                self._stop.wait(delay)
            finally:
                port, self._port = self._port, None
                with contextlib.suppress(serial.SerialException, OSError):
                    port.close()

    def _read_lines(self, port: serial.Serial, sink: Sink) -> None:
        """Hand over complete lines; an over-long line goes out capped (parse rejects it as too_long)
        and the rest of it, up to the next newline, is skipped."""
        buf = bytearray()
        skipping = False
        origin = self.config.port
        while not self._stop.is_set():
            chunk = port.read_until(b"\n", MAX_LINE_BYTES - len(buf) if not skipping else MAX_LINE_BYTES)
            if not chunk:
                continue  # read timeout: nothing on the wire
            if skipping:
                skipping = not chunk.endswith(b"\n")
                continue
            buf += chunk
            if chunk.endswith(b"\n") or len(buf) >= MAX_LINE_BYTES:
                skipping = not chunk.endswith(b"\n")
                self.lines += 1
                sink(RawMessage(bytes(buf), "serial", origin, time.time()))
                buf.clear()
            # else: a read timeout in the middle of a line; keep collecting


class MqttSource:
    """Subscribes to `<prefix>/+/telemetry` with a persistent session; resubscribes on every connect."""

    def __init__(self, config: MqttSourceConfig) -> None:
        self.config = config
        self.name = config.name
        self.client_id = config.client_id or f"edgewatch-{socket.gethostname()}-{config.name}"
        self.connects = 0
        self.messages = 0
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()
        self._lost_logged = False

    @property
    def subscribed(self) -> threading.Event:
        """Set once the broker has acknowledged the subscription of the current connection."""
        return self._subscribed

    def start(self, sink: Sink) -> None:
        if self._client is not None:
            raise RuntimeError(f"source {self.name} already started")
        client = make_client(self.config.mqtt, self.client_id, clean_start=False)
        topic, qos = self.config.topic, self.config.qos

        def on_connect(c: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags, rc, props) -> None:
            if rc.is_failure:
                log.error("MQTT source %s: broker refused connection: %s", self.name, rc)
                return
            self.connects += 1
            self._lost_logged = False
            # Always resubscribe: the broker may have lost the session (restart without persistence).
            c.subscribe(topic, qos=qos)
            log.info("MQTT source %s connected (session present: %s)", self.name, flags.session_present)

        def on_subscribe(c: mqtt.Client, userdata: object, mid: int, rcs: list, props) -> None:
            if any(r.is_failure for r in rcs):
                log.error("MQTT source %s: subscription to %s refused: %s", self.name, topic, rcs)
                return
            self._subscribed.set()

        def on_disconnect(c: mqtt.Client, userdata: object, flags, rc, props) -> None:
            self._subscribed.clear()
            if not self._lost_logged:
                self._lost_logged = True
                log.warning("MQTT source %s disconnected (%s); reconnecting with backoff", self.name, rc)

        def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            self.messages += 1
            try:
                sink(RawMessage(bytes(msg.payload), "mqtt", msg.topic, time.time()))
            except Exception:  # paho would stop its network thread on an exception from a callback
                log.exception("MQTT source %s: error handling a message on %s", self.name, msg.topic)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        self._client = client
        client.loop_start()

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.disconnect()
        client.loop_stop()


def make_source(config: SerialSourceConfig | MqttSourceConfig) -> Source:
    if isinstance(config, SerialSourceConfig):
        return SerialSource(config)
    return MqttSource(config)
