"""`chaperone operator`: the subcommand registers, and kopf is configured from the settings."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

import kopf

from chaperone_operator import cli
from chaperone_operator.handlers import WEBHOOKS
from chaperone_operator.main import FINALIZER, configure_kopf
from chaperone_operator.settings import OperatorSettings


def test_register_adds_the_operator_subcommand():
    parser = argparse.ArgumentParser()
    register_into = parser.add_subparsers(dest="command")
    cli.register(register_into)
    args = parser.parse_args(["operator", "--liveness", "http://0.0.0.0:8080/healthz", "--standalone",
                              "--log-format", "json", "--quiet"])
    assert args.func is cli.run and args.standalone and args.quiet and args.log_format == "json"


def test_module_entry_point_shows_help(repo_root):
    res = subprocess.run([sys.executable, "-m", "chaperone_operator.cli", "operator", "--help"],
                         capture_output=True, text=True, cwd=repo_root)
    assert res.returncode == 0 and "--liveness" in res.stdout


def test_configure_kopf():
    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorSettings(webhook_port=9555, peering_priority=5, standalone=True))
    server = settings.admission.server
    assert isinstance(server, kopf.WebhookServer) and server.port == 9555
    assert server.certfile == "/etc/chaperone/webhook/tls.crt"
    assert settings.admission.managed is None
    assert settings.persistence.finalizer == FINALIZER
    assert settings.peering.priority == 5 and settings.peering.standalone
    assert settings.posting.level == logging.WARNING
    random_priority = kopf.OperatorSettings()
    configure_kopf(random_priority, OperatorSettings())
    assert random_priority.peering.priority > 0 and not random_priority.peering.standalone


def test_every_webhook_path_is_a_registered_handler():
    registry = kopf._core.intents.registries.get_default_registry()  # populated by the import
    handlers = {h.id: h for h in registry._webhooks.get_all_handlers()}
    assert set(handlers) == set(WEBHOOKS)
    for path, (kind, plural) in WEBHOOKS.items():
        assert handlers[path].reason.value == kind
        assert handlers[path].selector.plural == plural or handlers[path].selector.any_name == plural


def test_pyproject_entry_point_plugs_into_the_chaperone_cli(repo_root, monkeypatch):
    import tomllib
    from importlib.metadata import EntryPoint

    import chaperone_sidecar.cli as chaperone_cli

    project = tomllib.loads((repo_root / "pyproject.toml").read_text())
    value = project["project"]["entry-points"]["chaperone.commands"]["operator"]
    assert value == "chaperone_operator.cli:register"
    point = EntryPoint("operator", value, "chaperone.commands")
    monkeypatch.setattr(chaperone_cli, "entry_points", lambda group: [point])
    args = chaperone_cli.build_parser().parse_args(["operator", "--standalone"])
    assert args.func is cli.run and args.standalone


def test_bad_settings_stop_the_operator_at_startup(repo_root):
    import os

    env = {**os.environ, "CHAPERONE_WEBHOOK_PORT": "0", "CHAPERONE_DEFAULT_MODE": "sideways",
           "KUBECONFIG": "/nonexistent"}
    res = subprocess.run([sys.executable, "-m", "chaperone_operator.cli", "operator", "--standalone"],
                         capture_output=True, text=True, cwd=repo_root, env=env, timeout=60)
    assert res.returncode != 0
    assert "CHAPERONE_WEBHOOK_PORT=0: not a TCP port" in res.stdout + res.stderr
