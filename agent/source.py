"""Sources: where raw sensor messages come from (a serial port, an MQTT broker; replay is another).

A source owns its I/O thread and hands every raw line or payload, untouched, to a sink
(`RawMessage`); parsing happens downstream so that every source is decoded and counted the same way.
Sources survive their transport going away: a serial adapter unplugged and plugged back, a broker
restarted. They log the first failure and the recovery, not every retry.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
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
# Takes every message of one network read at once: one hand-off (and one wake-up of the consumer) per
# burst instead of one per message.
BatchSink = Callable[[list[RawMessage]], None]

# Most PUBLISH packets the MQTT source reads per wake-up before it writes their PUBACKs and looks at the
# socket again (bounds the PUBACK delay under a flood; one wake-up per message otherwise).
READ_BATCH = 256
# Longest sleep of the MQTT source's thread: paces paho's keepalive bookkeeping; traffic and stop() wake
# it at once.
IDLE_WAIT_S = 1.0
# Bytes the MQTT source asks the kernel for per recv(): many PUBLISH packets at once (paho alone reads
# each packet with three recv() calls: its type byte, its length, its body).
RECV_CHUNK = 65536


@runtime_checkable
class Source(Protocol):
    """Anything that produces RawMessages on its own thread until stopped."""

    name: str

    def start(self, sink: Sink, sink_many: BatchSink | None = None) -> None:
        """Hand every message to `sink`, or, where the source reads several at once and `sink_many`
        is given, each such group to `sink_many` in one call (same order)."""
        ...

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

    def start(self, sink: Sink, sink_many: BatchSink | None = None) -> None:
        """Lines go to `sink` one by one (a serial line arrives alone); `sink_many` is not used."""
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


class _BufferedSocket:
    """The MQTT source's socket as paho sees it: reads in large chunks, and gathers writes on demand.

    paho reads a packet with three recv() calls (type byte, remaining length, body), each a system call
    that also drops and retakes the GIL, so the main loop and the source thread trade the GIL three
    times per reading. Here one recv() of up to RECV_CHUNK bytes feeds many packets from memory. While
    `gather` is on, send() only collects (paho's PUBACKs of one batch) and `flush()` writes them in
    one send(). Everything else is the wrapped socket's (plain or TLS). Bytes held here are invisible
    to select(), so `pending()` counts them, as an SSL socket's own does.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._rbuf = b""
        self._rpos = 0
        self._out = bytearray()
        self.gather = False

    def __getattr__(self, name: str) -> object:  # fileno, setsockopt, close, ... of the real socket
        return getattr(self._sock, name)

    def recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = self._sock.recv(max(bufsize, RECV_CHUNK))  # EAGAIN / SSLWantRead go to paho as before
            if len(data) <= bufsize:
                return data  # also b"" at EOF
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return len(self._rbuf) - self._rpos + inner

    def send(self, data: bytes | bytearray | memoryview) -> int:
        if self.gather:
            self._out += data
            return len(data)
        if self._out:  # keep the order behind what is still waiting
            self._out += data
            self.flush()
            return len(data)
        return self._sock.send(data)

    @property
    def unsent(self) -> int:
        return len(self._out)

    def flush(self) -> None:
        """Write what was gathered; a part the kernel does not take now stays for the next flush()."""
        while self._out:
            try:
                n = self._sock.send(self._out)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                return
            del self._out[:n]


class MqttSource:
    """Subscribes to `<prefix>/+/telemetry` with a persistent session; resubscribes on every connect.

    The source runs paho's network loop in its own thread rather than `loop_start()`, for the cost per
    message: paho's threaded loop reads one packet per select() and, for every PUBACK it queues, writes
    a byte to its wake-up socketpair and goes round select() again (two extra syscalls and a wake-up per
    reading). Here one wake-up reads every packet already waiting (up to READ_BATCH) through one large
    recv() (`_BufferedSocket`), hands them to the sink (with `sink_many`, in one call), then writes
    their PUBACKs together in one send(). A PUBACK still goes out only after its message was handed to
    the sink, as before; reconnects keep the same client and session.
    """

    def __init__(self, config: MqttSourceConfig, topic: str | None = None) -> None:
        """`topic` replaces the telemetry subscription (the agent's command listener uses it)."""
        self.config = config
        self.topic = topic or config.topic
        self.name = config.name
        self.client_id = config.client_id or f"edgewatch-{socket.gethostname()}-{config.name}"
        self.connects = 0
        self.messages = 0
        self._client: mqtt.Client | None = None
        self._subscribed = threading.Event()
        self._lost_logged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._up = False  # the current connection got its CONNACK (resets the backoff when it ends)
        self._batch: list[RawMessage] | None = None  # messages of the current read, with sink_many
        self._sink_many: BatchSink | None = None
        self._now = 0.0  # gateway clock at the current network read (received time of its batch)

    @property
    def subscribed(self) -> threading.Event:
        """Set once the broker has acknowledged the subscription of the current connection."""
        return self._subscribed

    def start(self, sink: Sink, sink_many: BatchSink | None = None) -> None:
        if self._client is not None:
            raise RuntimeError(f"source {self.name} already started")
        client = make_client(self.config.mqtt, self.client_id, clean_start=False)
        topic, qos = self.topic, self.config.qos
        self._sink_many = sink_many

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
            if not self._lost_logged and not self._stop.is_set():
                self._lost_logged = True
                log.warning("MQTT source %s disconnected (%s); reconnecting with backoff", self.name, rc)

        def on_message(c: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            self.messages += 1
            batch = self._batch
            if batch is not None:  # handed over with the rest of this read, before their PUBACKs
                batch.append(RawMessage(bytes(msg.payload), "mqtt", msg.topic, self._now))
                return
            try:
                sink(RawMessage(bytes(msg.payload), "mqtt", msg.topic, time.time()))
            except Exception:  # an exception from a callback would end the network loop
                log.exception("MQTT source %s: error handling a message on %s", self.name, msg.topic)

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        # With this callback set (and no loop_start), paho queues outgoing packets (PUBACK, SUBSCRIBE,
        # PINGREQ) instead of writing each at once; _serve writes them after each batch of reads.
        client.on_socket_register_write = _ignore_socket_callback
        self._client = client
        self._stop.clear()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(
            target=self._network, args=(client,), name=f"source-{self.name}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        self._stop.set()
        w = self._wake_w
        if w is not None:
            with contextlib.suppress(OSError):
                w.send(b"\0")
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=10.0)  # a connect in progress is bounded by paho's connect timeout
            if thread.is_alive():
                log.warning("MQTT source %s: network thread did not stop within 10 s", self.name)
                return  # it may still select() on the wake-up pair: leave it open
        for sock in (self._wake_w, self._wake_r):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None

    # -- the network thread ---------------------------------------------------------------------
    def _network(self, client: mqtt.Client) -> None:
        """Connect, serve until the connection drops, reconnect with backoff (doubling from
        reconnect_min_s up to reconnect_max_s, back to the minimum after a connection that came up)."""
        conn = self.config.mqtt
        delay = conn.reconnect_min_s
        failing = False
        while not self._stop.is_set():
            try:
                client.reconnect()  # make_client's connect_async stored the address; keeps the session
            except (OSError, ValueError) as exc:
                if not failing:
                    failing = True
                    log.warning(
                        "MQTT source %s: cannot connect to %s:%d (%s); retrying with backoff",
                        self.name,
                        conn.host,
                        conn.effective_port,
                        exc,
                    )
                self._stop.wait(delay)
                delay = min(delay * 2, conn.reconnect_max_s)
                continue
            self._up = False
            try:
                self._serve(client)
            except Exception:  # a bug must not end ingest for good: drop the connection, reconnect
                log.exception("MQTT source %s: network loop error; reconnecting", self.name)
            sock = client.socket()
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
            if self._stop.is_set():
                break
            if self._up:
                delay, failing = conn.reconnect_min_s, False
            self._stop.wait(delay)
            delay = min(delay * 2, conn.reconnect_max_s)

    def _serve(self, client: mqtt.Client) -> None:
        """One connection: wait for traffic or stop(); read what is waiting, then write what is queued."""
        wake = self._wake_r
        raw = client.socket()
        if raw is None:
            return
        # paho keeps its socket in `_sock` and uses only recv/send/close/fileno/pending of it.
        sock = raw if isinstance(raw, _BufferedSocket) else _BufferedSocket(raw)
        client._sock = sock
        while True:
            if client.socket() is not sock:
                return
            if self._stop.is_set():
                sock.flush()
                client.disconnect()
                client.loop_write()  # sends DISCONNECT; paho closes the socket after it
                return
            # Bytes already read (or decrypted by SSL) are invisible to select(): then do not wait.
            pending = sock.pending()
            readable = bool(pending)
            if not pending:
                wlist = [sock] if client.want_write() or sock.unsent else []
                try:
                    ready = select.select(
                        [sock, wake] if wake is not None else [sock], wlist, [], IDLE_WAIT_S
                    )
                except (OSError, ValueError, TypeError):
                    return  # socket closed under us: reconnect
                readable = sock in ready[0]
                if wake is not None and wake in ready[0]:
                    with contextlib.suppress(OSError):  # BlockingIOError once drained
                        while wake.recv(4096):
                            pass
            if readable and not self._read(client):
                return
            if (client.want_write() or sock.unsent) and not self._write(client, sock):
                return
            if client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:  # keepalive: PINGREQ, or the link is dead
                return
            if client.is_connected():
                self._up = True

    def _read(self, client: mqtt.Client) -> bool:
        """Read the packets waiting (up to READ_BATCH messages); False when the connection is gone.

        With `sink_many` the messages go to it in one call after the reads, also when the connection
        dropped half-way: they were read, so they are handed over (the broker may send them again,
        and the validator drops the duplicates, as when each went to the sink on its own)."""
        many = self._sink_many
        batch: list[RawMessage] = []
        if many is not None:
            self._now = time.time()  # one clock read per network read: the messages arrived together
            self._batch = batch
        ok = True
        try:
            for _ in range(READ_BATCH):
                before = self.messages
                if client.loop_read() != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
                    ok = False
                    break
                if self.messages == before:  # nothing more waiting (or a non-PUBLISH packet)
                    break
        finally:
            self._batch = None
            if batch and many is not None:
                try:
                    many(batch)
                except Exception:  # a bug downstream must not end the network loop
                    log.exception("MQTT source %s: error handling %d messages", self.name, len(batch))
        return ok

    @staticmethod
    def _write(client: mqtt.Client, sock: _BufferedSocket) -> bool:
        """Write every queued packet (PUBACKs of a batch, SUBSCRIBE, PINGREQ) in one send()."""
        sock.gather = True
        try:
            rc = client.loop_write()
        finally:
            sock.gather = False
        if rc != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
            return False
        try:
            sock.flush()
        except OSError:
            return False
        return True


def _ignore_socket_callback(client: mqtt.Client, userdata: object, sock: object) -> None:
    """paho's register-write hook: the source's own loop writes after each batch of reads instead."""


def make_source(config: SerialSourceConfig | MqttSourceConfig) -> Source:
    if isinstance(config, SerialSourceConfig):
        return SerialSource(config)
    return MqttSource(config)
