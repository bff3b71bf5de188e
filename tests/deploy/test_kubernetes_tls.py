"""deploy/kubernetes/tls/: the cert-manager example and the StatefulSet patch that turns TLS on.
The patched StatefulSet must still be schema-valid, set only variables kvstore reads, make a
configuration `kvstore serve` accepts, and the certificate must name every member the way
the peer identity check (kvstore/server/tls.py) asks."""

from __future__ import annotations

import copy
from typing import Any

import kubernetes_validate
import pytest
import yaml

from kvstore.server.config import load_config
from kvstore.server.tls import check_peer_identity
from tests.deploy.deployfiles import (
    DEPLOY,
    KUBERNETES_VERSIONS,
    cli_environment_names,
    expand,
    kubernetes_object,
    local_secret_file,
    serve_environment_names,
    statefulset_container,
)

TLS = DEPLOY / "kubernetes" / "tls"


def _merge_named(base: list[dict[str, Any]], patch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A strategic merge of a list keyed by `name`: patched items replace fields in place,
    new ones are appended (what `kubectl patch` does to env, volumeMounts and volumes)."""
    merged = [copy.deepcopy(item) for item in base]
    for item in patch:
        for existing in merged:
            if existing["name"] == item["name"]:
                _merge(existing, item)
                break
        else:
            merged.append(copy.deepcopy(item))
    return merged


def _merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        elif (
            isinstance(value, list) and value and isinstance(value[0], dict) and "name" in value[0]
        ):
            base[key] = _merge_named(base.get(key, []), value)
        else:
            base[key] = copy.deepcopy(value)


def _patched() -> dict[str, Any]:
    statefulset = copy.deepcopy(kubernetes_object("StatefulSet"))
    patch = yaml.safe_load((TLS / "statefulset-tls.yaml").read_text())
    _merge(statefulset, patch)
    return statefulset


def _environment(statefulset: dict[str, Any], ordinal: int) -> dict[str, str]:
    fields = {"metadata.name": f"kvstore-{ordinal}", "metadata.namespace": "kvstore"}
    env: dict[str, str] = {}
    for source in statefulset_container(statefulset).get("envFrom", []):
        config_map = kubernetes_object("ConfigMap", source["configMapRef"]["name"])
        env.update({str(k): str(v) for k, v in config_map["data"].items()})
    for item in statefulset_container(statefulset)["env"]:
        if "value" in item:
            env[item["name"]] = expand(str(item["value"]), env)
        else:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
    return env


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_patched_statefulset_is_schema_valid(version: str) -> None:
    assert kubernetes_validate.validate(_patched(), version, strict=True) == version


def test_the_patch_turns_tls_on_both_ports_from_the_secret() -> None:
    statefulset = _patched()
    container = statefulset_container(statefulset)
    env = _environment(statefulset, 1)
    assert {n for n in env if n.startswith("KVSTORE_")} <= (
        serve_environment_names() | cli_environment_names()
    )
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tls")
    volume = next(
        v for v in statefulset["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"
    )
    assert volume["secret"]["secretName"] == "kvstore-tls" and mount["readOnly"]
    for variable in ("KVSTORE_CERT_FILE", "KVSTORE_PEER_CERT_FILE", "KVSTORE_PEER_CA_FILE"):
        assert env[variable].startswith(mount["mountPath"] + "/")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["scheme"] == "HTTPS"
        assert container[probe]["httpGet"]["path"] in ("/healthz", "/readyz")
    config = load_config(None, {**env, "KVSTORE_CLUSTER_SECRET_FILE": local_secret_file()})
    assert config.peer_tls and config.client_tls
    assert config.client_url == "https://kvstore-1.kvstore-peer.kvstore.svc:7001"


def test_the_certificate_names_every_member_and_the_client_service() -> None:
    documents = list(yaml.safe_load_all((TLS / "cert-manager.yaml").read_text()))
    certificate = next(
        d
        for d in documents
        if d["kind"] == "Certificate" and d["spec"]["secretName"] == "kvstore-tls"
    )
    spec = certificate["spec"]
    assert {"server auth", "client auth"} <= set(spec["usages"])
    as_seen = {"subjectAltName": tuple(("DNS", name) for name in spec["dnsNames"])}
    statefulset = _patched()
    for ordinal in range(statefulset["spec"]["replicas"]):
        config = load_config(
            None,
            {
                **_environment(statefulset, ordinal),
                "KVSTORE_CLUSTER_SECRET_FILE": local_secret_file(),
            },
        )
        for node_id, address in config.peers:
            check_peer_identity(as_seen, node_id, address)
        host = config.client_url.split("//")[1].rsplit(":", 1)[0]
        check_peer_identity(as_seen, 1, f"{host}:7001")
    check_peer_identity(as_seen, 1, "kvstore.kvstore.svc:7001")
