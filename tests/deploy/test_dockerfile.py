"""deploy/Dockerfile, read at the parser level (no Docker engine runs here), and its
HEALTHCHECK command run for real against a stand-in /healthz."""

from __future__ import annotations

import http.server
import json
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from pathlib import PurePosixPath

import pytest

from tests.deploy.deployfiles import (
    DEPLOY,
    REPO,
    Instruction,
    dockerfile_healthcheck,
    dockerfile_instructions,
    serve_environment_names,
)

INSTRUCTIONS = dockerfile_instructions()


def _stages() -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for instruction in INSTRUCTIONS:
        if instruction[0] == "FROM":
            stages.append([])
        assert stages, "instructions before the first FROM"
        stages[-1].append(instruction)
    return stages


def _final(keyword: str) -> list[str]:
    return [arguments for kw, arguments in _stages()[-1] if kw == keyword]


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in _final("ENV"):
        for item in shlex.split(arguments):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def test_multi_stage_build_on_slim_python() -> None:
    stages = _stages()
    assert len(stages) == 2
    assert [s[0][1] for s in stages] == ["python:3.11-slim AS build", "python:3.11-slim AS run"]
    assert any("pip wheel" in arguments for kw, arguments in stages[0] if kw == "RUN")
    (install,) = _final("RUN")
    assert "from=build" in install and "--no-index" in install


def test_copied_sources_exist_and_pass_the_dockerignore() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for kw, arguments in _stages()[0]:
        if kw == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (REPO / source).exists(), source
                assert f"!{source.rstrip('/')}/" in ignore or f"!{source}" in ignore, source


def test_runs_kvstore_serve_as_an_unprivileged_user() -> None:
    (user,) = _final("USER")
    assert user.split(":")[0] not in ("root", "0")
    (entrypoint,) = _final("ENTRYPOINT")
    assert json.loads(entrypoint) == ["kvstore", "serve"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["kvstore"] == "kvstore.cli:main"


def test_data_volume_ports_and_settings() -> None:
    env = _env()
    (volume,) = _final("VOLUME")
    (volume_path,) = json.loads(volume)
    # The data directory is inside the volume, one level down (not the filesystem's root).
    assert PurePosixPath(env["KVSTORE_DATA_DIR"]).parent == PurePosixPath(volume_path)
    (expose,) = _final("EXPOSE")
    assert expose.split() == [
        env["KVSTORE_LISTEN_CLIENT"].rpartition(":")[2],
        env["KVSTORE_LISTEN_PEER"].rpartition(":")[2],
    ]
    assert expose.split() == ["7001", "7101"]
    known = serve_environment_names()
    assert {k for k in env if k.startswith("KVSTORE_")} <= known


def test_no_curl_or_wget_in_the_image() -> None:
    for _, arguments in INSTRUCTIONS:
        assert "curl" not in arguments and "wget" not in arguments


def test_healthcheck_uses_python_urllib_on_healthz() -> None:
    options, argv = dockerfile_healthcheck()
    assert "--interval=" in options and "--timeout=" in options
    assert argv[:2] == ["python", "-c"] and "urllib" in argv[2] and "/healthz" in argv[2]


def _healthcheck_command() -> list[str]:
    return [sys.executable, *dockerfile_healthcheck()[1][1:]]


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, name="healthz-stand-in", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _run_healthcheck(port: int) -> int:
    env = {"KVSTORE_LISTEN_CLIENT": f"0.0.0.0:{port}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(_healthcheck_command(), env=env, timeout=20, capture_output=True)
    return done.returncode


def test_healthcheck_passes_on_a_healthy_node(health_server: http.server.HTTPServer) -> None:
    _Health.status = 200
    assert _run_healthcheck(health_server.server_address[1]) == 0


def test_healthcheck_fails_on_an_error_or_no_node(health_server: http.server.HTTPServer) -> None:
    port = health_server.server_address[1]
    _Health.status = 500
    try:
        assert _run_healthcheck(port) != 0
    finally:
        _Health.status = 200
    health_server.shutdown()
    health_server.server_close()
    assert _run_healthcheck(port) != 0
