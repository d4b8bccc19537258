"""Configuration: the examples load, each kind of mistake gives its key path, secrets, docs coverage."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from agent.config import (
    MASK,
    AgentConfig,
    ConfigError,
    check_cli,
    load_config,
    masked,
    parse_config,
    warnings_for,
)
from agent.mqtt_client import MqttConnectionConfig
from agent.source import MqttSourceConfig, SerialSourceConfig

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

MINIMAL = """
[gateway]
id = "gw-01"
state_dir = "/var/lib/edgewatch"

[[sources]]
type = "serial"
name = "rs485"
port = "/dev/ttyUSB0"

[model]
path = "/etc/edgewatch/model"
"""


def write(tmp_path: Path, text: str, name: str = "edgewatch.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert str(path) in str(ei.value)  # every message names the file
    return ei.value.errors


def demo_config(tmp_path: Path, uplink: str = "true") -> Path:
    """examples/demo.toml filled in the way scripts/demo.sh does it."""
    text = (EXAMPLES / "demo.toml").read_text()
    for k, v in {
        "@PTY@": "/dev/pts/7",
        "@STATE@": str(tmp_path / "state"),
        "@PORT@": "18830",
        "@UPLINK@": uplink,
    }.items():
        text = text.replace(k, v)
    assert "@" not in re.sub(r"#.*", "", text)
    return write(tmp_path, text, "demo.toml")


def test_gateway_example_loads() -> None:
    cfg = load_config(EXAMPLES / "gateway.toml")
    assert cfg.gateway.id and cfg.db_path == Path("/var/lib/edgewatch/edgewatch.db")
    assert isinstance(cfg.sources[0], SerialSourceConfig) and cfg.sources[0].port == "/dev/ttyUSB0"
    assert cfg.uplink.mqtt.tls and cfg.uplink.mqtt.effective_port == 8883
    assert cfg.uplink.mqtt.password is None and cfg.uplink.mqtt.password_credential


@pytest.mark.parametrize("uplink", ["true", "false"])
def test_demo_template_loads_once_filled(tmp_path: Path, uplink: str) -> None:
    cfg = load_config(demo_config(tmp_path, uplink))
    assert cfg.sources[0].port == "/dev/pts/7"  # type: ignore[union-attr]
    assert cfg.uplink.enabled is (uplink == "true")
    assert cfg.uplink.mqtt.port == 18830
    assert cfg.model.path == Path("models/default")


def test_config_check_passes_both_examples(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for path in (EXAMPLES / "gateway.toml", demo_config(tmp_path)):
        assert check_cli(argparse.Namespace(file=str(path))) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"OK: {path}")
        assert '"gateway"' in out


def test_defaults_fill_in() -> None:
    import tomllib

    cfg = parse_config(tomllib.loads(MINIMAL))
    assert cfg.metrics.port == 9108
    assert cfg.buffer.synchronous == "NORMAL"
    assert cfg.window.max_gap_s == 5.0
    assert cfg.validation.effective_ranges()["temperature"] == (-40.0, 150.0)
    assert cfg.sources[0].name == "rs485"


def test_mqtt_source_gets_a_stable_client_id_per_gateway(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[sources]]\ntype = "mqtt"\nname = "local"\n[sources.mqtt]\nhost = "127.0.0.1"\n'
    cfg = load_config(write(tmp_path, text))
    src = cfg.sources[1]
    assert isinstance(src, MqttSourceConfig)
    assert src.client_id == "edgewatch-gw-01-local"
    assert src.mqtt.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        # a required key missing in the second source: the documented example
        ('\n[[sources]]\ntype = "serial"\nname = "b"\n', "sources[1].port: field required"),
        ("\n[buffer]\nbatchsize = 10\n", "buffer.batchsize: unknown key"),
        ("\n[metrics]\nport = 70000\n", "metrics.port: input should be less than or equal to 65535"),
        ('\n[metrics]\nport = "x"\n', "metrics.port: input should be a valid integer"),
        ('\n[[sources]]\ntype = "usb"\nport = "/dev/x"\n', "sources[1]: unknown source type 'usb'"),
        ('\n[[sources]]\nport = "/dev/x"\n', 'sources[1]: missing "type"'),
        ('\n[[sources]]\ntype = "serial"\nname = "rs485"\nport = "/dev/ttyUSB1"\n', "names must be unique"),
        (
            '\n[[sources]]\ntype = "serial"\nname = "two"\nport = "/dev/ttyUSB0"\n',
            "used by more than one source",
        ),
        ("\n[alerts]\nopen_k = 6\nopen_n = 5\n", "alerts: open_k (6) cannot exceed open_n (5)"),
        (
            "\n[alerts]\nrecovery_ratio = 1.2\n",
            "alerts.recovery_ratio: input should be less than or equal to 1",
        ),
        ("\n[threshold]\nhistory = 100\nmin_history = 500\n", "threshold.min_history (500) cannot exceed"),
        ('\n[buffer]\nsynchronous = "OFF"\n', "buffer.synchronous: input should be 'NORMAL' or 'FULL'"),
        (
            "\n[validation]\nranges = { temperature = [10, 5] }\n",
            "validation.ranges: range of 'temperature' must be [min, max]",
        ),
        (
            '\n[uplink.mqtt]\nusername = "u"\npassword = "p"\npassword_env = "P"\n',
            "uplink.mqtt: give at most one of password",
        ),
        ('\n[uplink.mqtt]\ntls_ca_file = "/ca.pem"\n', "uplink.mqtt: tls_ca_file set but tls = false"),
        ("\n[uplink.mqtt]\ntls_insecure = true\n", "uplink.mqtt.tls_insecure: unknown key"),
        (
            '\n[uplink]\nclient_id = "edgewatch-gw-01-local"\n[[sources]]\ntype = "mqtt"\nname = "local"\n',
            "used twice",
        ),
    ],
)
def test_each_mistake_names_its_key_path(tmp_path: Path, patch: str, expected: str) -> None:
    errs = errors_of(tmp_path, MINIMAL + patch)
    assert any(expected.lower() in e.lower() for e in errs), errs


def test_missing_sections_and_empty_sources(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, '[gateway]\nid = "gw"\n')
    assert "sources: field required" in errs
    assert "model: field required" in errs
    errs = errors_of(tmp_path, 'sources = []\n[gateway]\nid = "gw"\n[model]\npath = "m"\n')
    assert any("at least one" in e for e in errs)


def test_bad_gateway_id(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, MINIMAL.replace('id = "gw-01"', 'id = "gw 01/x"'))
    assert any(e.startswith("gateway.id: string should match pattern") for e in errs), errs


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "[gateway\nid = 1\n")
    assert errs[0].startswith("invalid TOML")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_check_cli_reports_errors_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, MINIMAL + "\n[buffer]\nbatchsize = 10\n")
    assert check_cli(argparse.Namespace(file=str(path))) == 2
    captured = capsys.readouterr()
    assert "buffer.batchsize: unknown key" in captured.err
    assert "OK" not in captured.out


def test_secret_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, MINIMAL + '\n[uplink.mqtt]\nusername = "gw-01"\npassword_env = "EW_CFG_TEST_PW"\n')
    monkeypatch.delenv("EW_CFG_TEST_PW", raising=False)
    cfg = load_config(path)
    assert any("env var EW_CFG_TEST_PW is not set" in w for w in warnings_for(cfg))
    monkeypatch.setenv("EW_CFG_TEST_PW", "hunter2")
    assert not any("EW_CFG_TEST_PW" in w for w in warnings_for(cfg))
    assert cfg.uplink.mqtt.resolve_password() == "hunter2"


def test_secret_from_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = MINIMAL + '\n[uplink.mqtt]\nusername = "gw-01"\npassword_credential = "mqtt-password"\n'
    cfg = load_config(write(tmp_path, text))
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert any("'mqtt-password' not found" in w for w in warnings_for(cfg))
    (creds / "mqtt-password").write_text("s3cret\n")
    assert not any("mqtt-password" in w for w in warnings_for(cfg))
    assert cfg.uplink.mqtt.resolve_password() == "s3cret"


def test_literal_password_is_masked_and_warned(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write(tmp_path, MINIMAL + '\n[uplink.mqtt]\nusername = "gw-01"\npassword = "hunter2"\n')
    cfg = load_config(path)
    assert masked(cfg)["uplink"]["mqtt"]["password"] == MASK
    assert check_cli(argparse.Namespace(file=str(path))) == 0
    captured = capsys.readouterr()
    assert "hunter2" not in captured.out + captured.err
    assert "literal password" in captured.err


# --- docs/configuration.md documents every key ------------------------------------------------------

SECTIONS: dict[str, type[BaseModel]] = {
    "[gateway]": AgentConfig.model_fields["gateway"].annotation,  # type: ignore[dict-item]
    '[[sources]] type = "serial"': SerialSourceConfig,
    '[[sources]] type = "mqtt"': MqttSourceConfig,
    "[sources.mqtt] and [uplink.mqtt]": MqttConnectionConfig,
}


def doc_sections() -> dict[str, str]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    parts = re.split(r"^## `(.+?)`\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_every_config_key_is_documented() -> None:
    sections = doc_sections()
    expected = dict(SECTIONS)
    for name, field in AgentConfig.model_fields.items():
        if name != "sources":
            expected.setdefault(f"[{name}]", field.annotation)  # type: ignore[arg-type]
    missing = []
    for title, model in expected.items():
        body = sections.get(title)
        if body is None:
            missing.append(f"section {title}")
            continue
        missing += [f"{title} {key}" for key in model.model_fields if f"| `{key}` |" not in body]
    assert not missing, f"not in docs/configuration.md: {missing}"


def test_plaintext_mqtt_off_this_machine_is_warned(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = load_config(write(tmp_path, MINIMAL + '\n[uplink.mqtt]\nhost = "broker.plant.example"\n'))
    assert any("uplink.mqtt: plaintext MQTT to broker.plant.example" in w for w in warnings_for(cfg))
    assert (
        check_cli(
            argparse.Namespace(file=str(write(tmp_path, MINIMAL + '\n[uplink.mqtt]\nhost = "10.1.2.3"\n')))
        )
        == 0
    )
    assert "plaintext MQTT to 10.1.2.3" in capsys.readouterr().err
    for host_tls in ('host = "127.0.0.1"', 'host = "broker.plant.example"\ntls = true'):
        cfg = load_config(write(tmp_path, MINIMAL + f"\n[uplink.mqtt]\n{host_tls}\n"))
        assert not any("plaintext" in w for w in warnings_for(cfg))
