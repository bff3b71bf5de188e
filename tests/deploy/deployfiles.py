"""Reading deploy/ the way its consumers do, for the deployment tests.

Kubernetes: the documents of deploy/kubernetes/*.yaml, and the environment a StatefulSet pod
gets (ConfigMap `envFrom`, then `env` with downward-API fields and `$(VAR)` references
expanded as the kubelet expands them). Compose: the services with their merged environment.
The names of the variables `kvstore serve` reads come from kvstore.server.config and
kvstore.server.discovery, so renaming one there breaks these tests instead of the deployment.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
# The oldest Kubernetes the manifests promise to work on, and the newest schemas shipped.
KUBERNETES_VERSIONS = ("1.30", "1.37")

Document = dict[str, Any]


def kubernetes_documents() -> Iterator[tuple[Path, Document]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        with path.open() as file:
            for document in yaml.safe_load_all(file):
                if document:
                    yield path, document


def kubernetes_object(kind: str, name: str | None = None) -> Document:
    found = [
        document
        for _, document in kubernetes_documents()
        if document["kind"] == kind and (name is None or document["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def statefulset_container(statefulset: Document) -> Document:
    containers = statefulset["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Document = containers[0]
    return container


# The kubelet's $(VAR) expansion: $$ escapes a dollar, unknown references stay as written.
_REFERENCE = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(value: str, defined: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return defined.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, value)


def references(value: str) -> set[str]:
    return {m.group(1) for m in _REFERENCE.finditer(value) if m.group(1)}


def pod_environment(ordinal: int, namespace: str = "default") -> dict[str, str]:
    """The environment the StatefulSet's container gets in pod `<set>-<ordinal>`."""
    statefulset = kubernetes_object("StatefulSet")
    pod_fields = {
        "metadata.name": f"{statefulset['metadata']['name']}-{ordinal}",
        "metadata.namespace": namespace,
    }
    container = statefulset_container(statefulset)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config_map = kubernetes_object("ConfigMap", source["configMapRef"]["name"])
        env.update({str(k): str(v) for k, v in config_map["data"].items()})
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        else:
            field_path = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = pod_fields[field_path]
    return env


Instruction = tuple[str, str]


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[Instruction]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, arguments = line.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "dangling line continuation"
    return instructions


def dockerfile_healthcheck() -> tuple[str, list[str]]:
    """The HEALTHCHECK's options and its CMD argv (exec form)."""
    (healthcheck,) = [args for kw, args in dockerfile_instructions() if kw == "HEALTHCHECK"]
    options, _, command = healthcheck.partition("CMD ")
    argv: list[str] = json.loads(command)
    return options, argv


def compose_file() -> Document:
    with (DEPLOY / "compose.yaml").open() as file:
        document: Document = yaml.safe_load(file)
    return document


def compose_environment(service: Document) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


def env_file(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile: KEY=value lines, # comments, no expansion."""
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";")):
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {line!r} is not KEY=value"
            values[key.strip()] = value.strip()
    return values


def serve_environment_names() -> set[str]:
    """Every KVSTORE_* variable `kvstore serve` reads."""
    from kvstore.server import discovery

    names = {"KVSTORE_" + name.upper() for name in _config_module().option_names()}
    names |= {"KVSTORE_CONFIG", discovery.RESOLVE_ENV, discovery.HOSTNAME_ENV}
    names |= {discovery.REPLICAS_ENV, discovery.PEER_SERVICE_ENV, discovery.PEER_PORT_ENV}
    return names


def cli_environment_names() -> set[str]:
    """KVSTORE_* variables the `kvstore` client commands read (set for `kubectl exec`)."""
    from kvstore import client_cli

    return {client_cli.ENDPOINTS_ENV, "KVSTORE_TOKEN"} | {v for _, v, _ in client_cli._TLS_FLAGS}


SECRET_FILE_VARIABLE = "KVSTORE_CLUSTER_SECRET_FILE"


def local_secret_file() -> str:
    """A cluster secret file standing in for the one a deployment mounts (a Kubernetes
    Secret, a Compose secret, /etc/kvstore/cluster.secret), which this machine lacks."""
    path = Path(tempfile.gettempdir()) / f"kvstore-deploy-test-{os.getuid()}.secret"
    if not path.exists():
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write("deploy-test-secret-0123456789abcdef\n")
    return str(path)


def with_test_secret(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with its cluster secret file replaced by local_secret_file()."""
    assert SECRET_FILE_VARIABLE in environ, "the deployment sets no cluster secret file"
    return {**environ, SECRET_FILE_VARIABLE: local_secret_file()}


def load_serve_config(environ: Mapping[str, str]) -> Any:
    """The ServeConfig `kvstore serve` would build from this environment alone (with the
    mounted secret file replaced by a local one)."""
    return _config_module().load_config(None, environ=with_test_secret(environ))


def _config_module() -> Any:
    import kvstore.server.config

    return kvstore.server.config
