"""deploy/systemd/: the kvstore@.service template and the example environment file.

Parsed here; when `systemd-analyze` is installed it also verifies the unit (unknown keys and
bad values are reported) and scores its sandboxing, offline, without starting anything."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.deployfiles import DEPLOY, REPO, env_file, load_serve_config
from tests.deploy.deployfiles import serve_environment_names as known_names

UNIT = DEPLOY / "systemd" / "kvstore@.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "kvstore.env.example"
INSTALLED_BINARY = "/opt/kvstore/bin/kvstore"


def _unit() -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, line
        current.append((key.strip(), value.strip()))
    return sections


def _values(section: str, key: str) -> list[str]:
    return [value for k, value in _unit()[section] if k == key]


def _seconds(text: str) -> int:
    match = re.fullmatch(r"(\d+)(s|min)?", text)
    assert match, text
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_instance_name_is_the_node_id() -> None:
    (exec_start,) = _values("Service", "ExecStart")
    assert exec_start.split()[0] == INSTALLED_BINARY
    assert exec_start.split()[1:] == ["serve", "--id", "%i", "--data-dir", "%S/kvstore/%i"]
    assert _values("Service", "StateDirectory") == ["kvstore/%i"]
    assert _values("Service", "EnvironmentFile") == [
        "/etc/kvstore/kvstore.env",
        "-/etc/kvstore/kvstore-%i.env",
    ]


def test_restarts_and_stops_gracefully() -> None:
    assert _values("Service", "Restart") == ["on-failure"]
    assert _values("Service", "KillSignal") == ["SIGTERM"]
    assert _seconds(_values("Service", "TimeoutStopSec")[0]) >= 20
    assert int(_values("Service", "LimitNOFILE")[0]) >= 65536
    assert _values("Install", "WantedBy") == ["multi-user.target"]


def test_runs_unprivileged_and_sandboxed() -> None:
    assert _values("Service", "User") == ["kvstore"]
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectControlGroups",
        "RestrictNamespaces",
    ):
        assert _values("Service", key) == ["yes"], key
    assert _values("Service", "ProtectSystem") == ["strict"]
    assert _values("Service", "CapabilityBoundingSet") == [""]


def test_env_example_sets_only_variables_kvstore_serve_reads() -> None:
    values = env_file(ENV_EXAMPLE)
    assert set(values) <= known_names()
    # The unit passes the id and the data directory from the instance name.
    assert "KVSTORE_ID" not in values and "KVSTORE_DATA_DIR" not in values


def test_kvstore_serve_accepts_the_example_with_an_instance_id() -> None:
    environ = {**env_file(ENV_EXAMPLE), "KVSTORE_ID": "1", "KVSTORE_DATA_DIR": "/var/lib/kvstore/1"}
    config = load_serve_config(environ)
    assert sorted(config.peer_addresses) == [1, 2, 3]
    assert config.client_url.startswith("http://kv1.")


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed")
    return path


def _unit_for_analysis(tmp_path: Path) -> Path:
    # systemd-analyze insists that ExecStart's binary exists: point it at the venv's kvstore.
    kvstore = REPO / ".venv" / "bin" / "kvstore"
    binary = kvstore if kvstore.exists() else Path(shutil.which("true") or "/bin/true")
    unit = tmp_path / "kvstore@1.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(binary)))
    return unit


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _unit_for_analysis(tmp_path)
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr


def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    unit = _unit_for_analysis(tmp_path)
    done = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # Exposure 0.0 (locked down) .. 10.0 (unprotected); 2.0 is well inside systemd's "OK".
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
