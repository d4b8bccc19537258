"""Docs stay true to the code: every CLI command is in the README, every doc the README links exists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from agent.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands(parser: argparse.ArgumentParser, prefix: str = "edgewatch") -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = commands(sub, f"{prefix} {name}")
                out += nested or [f"{prefix} {name}"]
    return out


@pytest.mark.parametrize("command", commands(build_parser()))
def test_every_cli_command_is_documented_in_the_readme(command: str) -> None:
    assert f"`{command}" in README, f"{command!r} is missing from README.md's command table"


def test_every_linked_doc_exists() -> None:
    for link in re.findall(r"\]\(((?:docs|examples)/[^)#]+)\)", README):
        assert (ROOT / link).exists(), link


def test_readme_names_the_two_setup_commands() -> None:
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_readme_minimal_config_is_valid(tmp_path: Path) -> None:
    from agent.config import load_config

    block = re.search(r"A minimal config:\n\n```toml\n(.*?)```", README, re.S)
    assert block, "README lost its minimal config example"
    path = tmp_path / "minimal.toml"
    path.write_text(block.group(1))
    config = load_config(path)
    assert config.uplink.mqtt.tls and config.sources[0].type == "serial"
