"""Uplink: a durable SQLite outbox drained to an MQTT broker with QoS 1.

Stages hand `Event`s to `Uplink.enqueue`; they are written to the `outbox` table first and deleted only
when the broker acknowledged them (PUBACK), so a broker outage, a network cut or an agent restart loses
nothing that fits inside the caps. Delivery is at-least-once: consumers drop duplicates by `msg_id`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

try:  # the shared connection settings (agent/mqtt_client.py) land separately
    from agent.mqtt_client import MqttConnectionConfig
except ImportError:  # pragma: no cover - temporary stand-in with the same core fields

    class MqttConnectionConfig(BaseModel):  # type: ignore[no-redef]
        """Stand-in until agent/mqtt_client.py exists: broker address only."""

        model_config = ConfigDict(extra="forbid")
        host: str = Field("127.0.0.1", description="MQTT broker host name or address")
        port: int = Field(1883, ge=1, le=65535, description="MQTT broker TCP port")
        keepalive: int = Field(30, ge=5, description="MQTT keepalive interval in seconds")


class UplinkConfig(BaseModel):
    """Where and how events go upstream, and how much the outbox may hold while the broker is away."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="Send events upstream over MQTT; false keeps only the console sink"
    )
    mqtt: MqttConnectionConfig = Field(
        default_factory=MqttConnectionConfig, description="Upstream broker connection (address, auth, TLS)"
    )
    client_id: str | None = Field(
        None, description="MQTT client id; default 'edgewatch-<gateway id>' so it is stable across restarts"
    )
    topic_prefix: str = Field(
        "edgewatch", min_length=1, description="First topic level: <prefix>/<gateway>/<device>/<kind>"
    )
    qos: Literal[1] = Field(1, description="MQTT QoS for every message; 1 = at least once (PUBACK deletes)")
    max_inflight: int = Field(
        20, ge=1, le=1000, description="Messages published but not yet acknowledged by the broker at once"
    )
    max_rows: int = Field(
        100_000, ge=1, description="Outbox cap in messages; the drop policy applies beyond it"
    )
    max_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Outbox cap in payload bytes (64 MiB default)"
    )
    max_age_s: float = Field(
        7 * 24 * 3600.0, gt=0, description="Messages older than this are dropped unsent (reason 'expired')"
    )
    drop_policy: Literal["drop_oldest", "reject_new"] = Field(
        "drop_oldest",
        description="When a cap is reached: delete the oldest messages to make room, or refuse the new one",
    )
    reconnect_min_s: float = Field(1.0, gt=0, description="First reconnect delay after a lost connection")
    reconnect_max_s: float = Field(60.0, gt=0, description="Upper bound of the exponential reconnect delay")
    reconnect_jitter: float = Field(
        0.2, ge=0, le=1, description="Random +- fraction added to each reconnect delay so gateways spread out"
    )
    console: bool = Field(
        False, description="Also print every event as one compact JSON line on stdout (demo)"
    )
