"""The agent's TOML configuration: one pydantic model composed of each stage's own `<Stage>Config`.

Unknown keys are errors everywhere (a typo must not silently fall back to a default), every error
names its key path and the file, and secrets never have to be in the file (see agent.mqtt_client).
Relative paths are taken relative to the working directory (systemd: WorkingDirectory=), so a real
gateway config should use absolute paths. Every key is documented in docs/configuration.md (a test
keeps that true).
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.alert import AlertConfig
from agent.buffer import BufferConfig
from agent.command import CommandConfig
from agent.drift import DriftConfig
from agent.health import HealthConfig
from agent.mqtt_client import MqttConnectionConfig, is_loopback
from agent.screen import ScreenConfig
from agent.source import MqttSourceConfig, SerialSourceConfig, SourceConfig
from agent.threshold import ThresholdConfig
from agent.uplink import UplinkConfig
from agent.validate import ValidationConfig
from agent.webhook import WebhookConfig
from agent.window import WindowConfig

DB_FILE = "edgewatch.db"
MASK = "********"


class ConfigError(Exception):
    """An invalid configuration. `errors` are lines like ``sources[1].port: field required``."""

    def __init__(self, path: str | Path, errors: list[str]) -> None:
        self.path = str(path)
        self.errors = errors
        super().__init__("\n".join(f"{self.path}: {e}" for e in errors))


class GatewayConfig(BaseModel):
    """Who this gateway is and where it keeps its state."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Gateway id, unique in the fleet; used in upstream topics and MQTT client ids.",
    )
    state_dir: Path = Field(
        Path("/var/lib/edgewatch"),
        description=f"Writable directory for the SQLite database ({DB_FILE}: readings, scores, alert "
        "state, the outbox). Must survive reboots and upgrades.",
    )

    @property
    def db_path(self) -> Path:
        return self.state_dir / DB_FILE


class ModelConfig(BaseModel):
    """The model bundle to score with."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(
        description="Model bundle directory (manifest.json + model.onnx). It is watched: a new bundle "
        "written there is verified and swapped in; a broken one is refused and the old one kept."
    )
    threads: int = Field(1, ge=1, le=64, description="onnxruntime intra-op threads for scoring.")
    watch_interval_s: float = Field(
        10.0, gt=0, description="How often to check the bundle directory for a new model, in seconds."
    )
    shadow_windows: int = Field(
        200,
        ge=0,
        description="A new bundle is first scored in shadow beside the current one for this many windows "
        "(scores stored, verdicts compared, no alerts), then promoted; 0 swaps it in at once. After a "
        "promotion the old model is kept for as many windows and an error of the new one rolls back.",
    )
    min_agreement: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        description="Promote the shadow only if its verdicts agree with the current model's on at least "
        "this share of the windows both scored (0 = promote regardless); otherwise it is refused.",
    )


class MetricsConfig(BaseModel):
    """The Prometheus endpoint."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve Prometheus metrics over HTTP.")
    host: str = Field(
        "127.0.0.1", description="Address to listen on; 127.0.0.1 keeps it local, 0.0.0.0 exposes it."
    )
    port: int = Field(9108, ge=1, le=65535, description="TCP port of the metrics endpoint.")


class SchedulerConfig(BaseModel):
    """Periodic jobs of the running agent."""

    model_config = ConfigDict(extra="forbid")

    retention_interval_s: float = Field(
        600.0, gt=0, description="How often buffer retention (age and size caps) and outbox expiry run."
    )
    status_interval_s: float = Field(
        60.0, gt=0, description="How often the retained status message is republished upstream."
    )
    flush_interval_s: float = Field(
        10.0, gt=0, description="How often threshold baselines are saved to SQLite (they also are on stop)."
    )


class AgentConfig(BaseModel):
    """The whole agent configuration (one TOML file)."""

    model_config = ConfigDict(extra="forbid")

    gateway: GatewayConfig = Field(description="[gateway]: identity and state directory.")
    sources: list[SourceConfig] = Field(
        description="[[sources]]: where readings come from; at least one (serial or mqtt)."
    )
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="[validation]: plausibility checks."
    )
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="[buffer]: local SQLite storage.")
    window: WindowConfig = Field(default_factory=WindowConfig, description="[window]: grid and gap handling.")
    model: ModelConfig = Field(description="[model]: the model bundle.")
    threshold: ThresholdConfig = Field(
        default_factory=ThresholdConfig, description="[threshold]: anomaly threshold per device."
    )
    alerts: AlertConfig = Field(default_factory=AlertConfig, description="[alerts]: alert lifecycle.")
    screen: ScreenConfig = Field(
        default_factory=ScreenConfig,
        description="[screen]: cheap per-device screen choosing the windows the autoencoder scores.",
    )
    health: HealthConfig = Field(default_factory=HealthConfig, description="[health]: sensor-health events.")
    uplink: UplinkConfig = Field(default_factory=UplinkConfig, description="[uplink]: upstream MQTT.")
    webhook: WebhookConfig = Field(
        default_factory=WebhookConfig,
        description="[webhook]: alerts POSTed as JSON to an HTTP endpoint (docs/webhook.md).",
    )
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="[metrics]: Prometheus.")
    scheduler: SchedulerConfig = Field(
        default_factory=SchedulerConfig, description="[scheduler]: periodic jobs."
    )
    commands: CommandConfig = Field(
        default_factory=CommandConfig, description="[commands]: the inbound command topic (labels, reload)."
    )
    drift: DriftConfig = Field(
        default_factory=DriftConfig,
        description="[drift]: each device against its own reference period (docs/drift.md).",
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> AgentConfig:
        if not self.sources:
            raise ValueError("sources: at least one [[sources]] entry is needed")
        dup = [n for n, c in Counter(s.name for s in self.sources).items() if c > 1]
        if dup:
            raise ValueError(f"sources: names must be unique, repeated: {', '.join(dup)}")
        ports = [s.port for s in self.sources if isinstance(s, SerialSourceConfig)]
        dup = [p for p, c in Counter(ports).items() if c > 1]
        if dup:
            raise ValueError(f"sources: serial port {dup[0]} is used by more than one source")
        for s in self.sources:
            if isinstance(s, MqttSourceConfig) and s.client_id is None:
                s.client_id = f"edgewatch-{self.gateway.id}-{s.name}"
        ids = [s.client_id for s in self.sources if isinstance(s, MqttSourceConfig)]
        if self.uplink.enabled:
            ids.append(self.uplink.client_id or f"edgewatch-{self.gateway.id}")
            if self.commands.enabled:
                ids.append(self.commands.client_id or f"edgewatch-{self.gateway.id}-cmd")
        dup = [i for i, c in Counter(ids).items() if c > 1]
        if dup:
            raise ValueError(
                f"MQTT client id {dup[0]!r} is used twice (sources / uplink); a broker drops one"
            )
        if self.threshold.min_history > self.threshold.history:
            raise ValueError(
                f"threshold.min_history ({self.threshold.min_history}) cannot exceed "
                f"threshold.history ({self.threshold.history})"
            )
        if self.screen.enabled and self.threshold.ewma_alpha < 1.0:
            raise ValueError(
                "screen.enabled (on by default) cannot be combined with threshold.ewma_alpha < 1 (the "
                "smoothed score would average over the scored windows only): set [screen] enabled = false "
                "to use a smoothed threshold"
            )
        return self

    @property
    def db_path(self) -> Path:
        return self.gateway.db_path

    def mqtt_connections(self) -> dict[str, MqttConnectionConfig]:
        """Every broker connection by key path (for secret checks)."""
        conns = {
            f"sources[{i}].mqtt": s.mqtt
            for i, s in enumerate(self.sources)
            if isinstance(s, MqttSourceConfig)
        }
        if self.uplink.enabled:
            conns["uplink.mqtt"] = self.uplink.mqtt
        return conns


def _loc(loc: tuple[Any, ...]) -> str:
    """('sources', 1, 'serial', 'port') -> 'sources[1].port' (the union tag is noise to a user)."""
    out = ""
    prev: Any = None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(prev, int) and part in ("serial", "mqtt") and out.startswith("sources"):
            pass
        else:
            out += f".{part}" if out else str(part)
        prev = part
    return out


def _message(err: dict[str, Any]) -> str:
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    if err["type"] == "missing":
        return "field required"
    if err["type"] == "extra_forbidden":
        return "unknown key (not allowed here; check the spelling)"
    if err["type"] == "union_tag_invalid":
        return f'unknown source type {err.get("ctx", {}).get("tag")!r}; expected "serial" or "mqtt"'
    if err["type"] == "union_tag_not_found":
        return 'missing "type" ("serial" or "mqtt")'
    return msg[:1].lower() + msg[1:]


def format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        where = _loc(tuple(err["loc"]))
        msg = _message(err)
        lines.append(f"{where}: {msg}" if where else msg)
    return lines


def parse_config(data: dict[str, Any], path: str | Path = "<config>") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(path, format_errors(e)) from None


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a TOML file; ConfigError (with key paths and the file name) if anything is wrong."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, [f"cannot read: {e.strerror or e}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"invalid TOML: {e}"]) from None
    return parse_config(data, path)


def masked(config: AgentConfig) -> dict[str, Any]:
    """The effective settings as plain data, with literal secrets replaced."""
    data = config.model_dump(mode="json")

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "password" and v is not None:
                    node[k] = MASK
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    return data


def warnings_for(config: AgentConfig) -> list[str]:
    """Things that are valid but will not work on this machine as it is now (secrets, files)."""
    out = []
    for where, conn in config.mqtt_connections().items():
        if conn.password is not None:
            out.append(
                f"{where}.password: a literal password is in the file; prefer password_env or password_credential"
            )
        out += [f"{where}: {p}" for p in conn.check_secrets()]
        if not conn.tls and not is_loopback(conn.host):
            out.append(
                f"{where}: plaintext MQTT to {conn.host}: anyone on that network can read and forge "
                "readings, alerts and commands; set tls = true (docs/security.md)"
            )
    if config.webhook.enabled:
        out += [f"webhook: {p}" for p in config.webhook.check_secrets()]
    if not (config.model.path / "manifest.json").is_file():
        out.append(f"model.path: no manifest.json in {config.model.path}")
    return out


def check_cli(args: argparse.Namespace) -> int:
    """`edgewatch config check FILE`: 0 and the effective settings if valid, 2 and the errors if not.

    Secrets and files that cannot be read here are warnings, not errors: the check may run on another
    machine than the gateway, or outside the systemd unit that provides the credentials.
    """
    try:
        config = load_config(args.file)
    except ConfigError as e:
        print(
            f"{e.path}: invalid configuration ({len(e.errors)} error{'s' * (len(e.errors) > 1)}):",
            file=sys.stderr,
        )
        for line in e.errors:
            print(f"  {line}", file=sys.stderr)
        return 2
    for w in warnings_for(config):
        print(f"warning: {w}", file=sys.stderr)
    print(f"OK: {args.file}")
    print(json.dumps(masked(config), indent=2))
    return 0
