"""ServeConfig: precedence flags > environment > TOML > defaults, validation, StatefulSet mode."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvstore.server.config import (
    add_arguments,
    default_text,
    load_config,
    option_names,
    parse_peers,
)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_defaults_and_single_node() -> None:
    config = load_config(_args("--id", "1"), environ={})
    assert config.cluster_id == "kvstore"
    assert config.tick_interval_ms == 10 and config.election_ticks == 20
    assert config.heartbeat_ticks == 5
    assert config.client_url == "http://127.0.0.1:7001"
    assert config.peer_addresses == {1: "127.0.0.1:7101"}


def test_flags_beat_environment_beat_toml(tmp_path: Path) -> None:
    toml = tmp_path / "kv.toml"
    toml.write_text(
        'id = 2\npeers = "1=a:1,2=b:2,3=c:3"\ntick-interval-ms = 7\nelection_ticks = 30\n'
        'cluster-id = "from-toml"\n'
    )
    env = {"KVSTORE_CONFIG": str(toml), "KVSTORE_TICK_INTERVAL_MS": "8", "KVSTORE_ID": "2"}
    config = load_config(_args("--tick-interval-ms", "9"), environ=env)
    assert config.tick_interval_ms == 9
    assert config.election_ticks == 30
    assert config.cluster_id == "from-toml"
    assert config.peer_addresses == {1: "a:1", 2: "b:2", 3: "c:3"}
    assert load_config(_args(), environ=env).tick_interval_ms == 8


@pytest.mark.parametrize(
    "argv",
    [
        ("--id", "0"),
        ("--id", "4", "--peers", "1=a:1,2=b:2"),
        ("--id", "1", "--tick-interval-ms", "0"),
        ("--id", "1", "--heartbeat-ticks", "30"),
        ("--id", "1", "--listen-client", "nope"),
        ("--id", "x"),
        ("--id", "1", "--log-level", "loud"),
        ("--id", "1", "--snapshot-log-ratio", "-1"),
        ("--id", "1", "--snapshot-log-ratio", "inf"),
        ("--id", "1", "--snapshot-log-ratio", "nan"),
        ("--id", "1", "--client-connections-max", "0"),
        ("--id", "1", "--client-header-timeout-ms", "0"),
        ("--id", "1", "--client-idle-timeout-ms", "-5"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(argv: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        load_config(_args(*argv), environ={})


def test_snapshot_log_ratio_from_environment_and_default() -> None:
    assert load_config(_args("--id", "1"), environ={}).snapshot_log_ratio == 1.0
    env = {"KVSTORE_SNAPSHOT_LOG_RATIO": "0.5"}
    assert load_config(_args("--id", "1"), environ=env).snapshot_log_ratio == 0.5


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    toml = tmp_path / "kv.toml"
    toml.write_text("id = 1\nbogus = 3\n")
    with pytest.raises(ValueError, match="bogus"):
        load_config(_args("--config", str(toml)), environ={})


def test_statefulset_mode_derives_id_and_peers() -> None:
    env = {
        "KVSTORE_STATEFULSET_REPLICAS": "3",
        "KVSTORE_PEER_SERVICE": "kvstore-peer",
        "KVSTORE_HOSTNAME": "kvstore-2",
    }
    config = load_config(_args(), environ=env)
    assert config.id == 3
    assert config.peer_addresses[1] == "kvstore-0.kvstore-peer:7101"


def test_parse_peers() -> None:
    assert parse_peers("1=127.0.0.1:1, 2=h:2") == {1: "127.0.0.1:1", 2: "h:2"}
    with pytest.raises(ValueError):
        parse_peers("a=b")


def test_client_connection_settings_from_every_source(tmp_path: Path) -> None:
    defaults = load_config(_args("--id", "1"), environ={})
    assert defaults.client_connections_max == 10_000
    assert defaults.client_connections_per_source_max == 1_000
    assert defaults.client_header_timeout_ms == 10_000
    assert defaults.client_body_timeout_ms == 30_000
    assert defaults.client_idle_timeout_ms == 60_000
    toml = tmp_path / "kv.toml"
    toml.write_text("id = 1\nclient-connections-max = 500\nclient_body_timeout_ms = 7000\n")
    env = {"KVSTORE_CONFIG": str(toml), "KVSTORE_CLIENT_IDLE_TIMEOUT_MS": "1234"}
    config = load_config(_args("--client-connections-per-source-max", "50"), environ=env)
    assert config.client_connections_max == 500
    assert config.client_body_timeout_ms == 7000
    assert config.client_idle_timeout_ms == 1234
    assert config.client_connections_per_source_max == 50


def _readme_defaults() -> dict[str, str]:
    """{option name: default cell} from docs/configuration.md's `kvstore serve` options table."""
    readme = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    rows: dict[str, str] = {}
    for line in readme.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`--"):
            rows[cells[0].strip("`").removeprefix("--").replace("-", "_")] = cells[1].strip("`")
    return rows


def test_the_readme_and_the_help_show_the_dataclass_defaults() -> None:
    """A default is written once, in ServeConfig: the help text is built from it and the
    README's table must agree with it."""
    readme = _readme_defaults()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {action.dest: action.help or "" for action in parser._actions}
    for name in option_names():
        assert name in readme, f"docs/configuration.md has no row for --{name.replace('_', '-')}"
        default = default_text(name)
        if default is not None:
            assert readme[name] == default, name
            assert helps[name].endswith(f"(default {default})"), name
