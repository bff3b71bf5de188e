"""deploy/kubernetes/: schema-valid for the Kubernetes versions we support, and consistent
with itself and with what `kvstore serve` reads (StatefulSet mode)."""

from __future__ import annotations

import copy
import re
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest

from tests.deploy.deployfiles import (
    KUBERNETES_VERSIONS,
    Document,
    cli_environment_names,
    kubernetes_documents,
    kubernetes_object,
    load_serve_config,
    pod_environment,
    references,
    serve_environment_names,
    statefulset_container,
)

DOCUMENTS = list(kubernetes_documents())
LABELS = {"app.kubernetes.io/name": "kvstore", "app.kubernetes.io/instance": "kvstore"}


def _id(item: tuple[Path, Document]) -> str:
    path, document = item
    return f"{path.name}:{document['kind']}/{document['metadata']['name']}"


def test_manifests_are_found() -> None:
    kinds = sorted(document["kind"] for _, document in DOCUMENTS)
    assert kinds == [
        "ConfigMap", "NetworkPolicy", "PodDisruptionBudget", "Service", "Service", "StatefulSet"
    ]  # fmt: skip


def test_only_members_reach_the_peer_port() -> None:
    """Issue 16: any pod could dial the peer port. The policy selects the kvstore pods and
    lets the peer port be reached from kvstore pods only; the client port from anywhere."""
    policy = kubernetes_object("NetworkPolicy")["spec"]
    pod_labels = kubernetes_object("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(by_port) == {"peer", "client"}
    assert by_port["peer"] == [{"podSelector": {"matchLabels": LABELS}}]
    container_ports = {
        p["name"] for p in statefulset_container(kubernetes_object("StatefulSet"))["ports"]
    }
    assert set(by_port) <= container_ports


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("item", DOCUMENTS, ids=_id)
def test_manifest_matches_kubernetes_schema(item: tuple[Path, Document], version: str) -> None:
    # strict: unknown fields (a typo such as `readinessprobe`) fail instead of being ignored.
    assert kubernetes_validate.validate(item[1], version, strict=True) == version


def test_validator_rejects_a_misspelt_field() -> None:
    broken = copy.deepcopy(kubernetes_object("StatefulSet"))
    container = statefulset_container(broken)
    container["readinessprobe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


def test_statefulset_starts_all_nodes_and_keeps_their_data() -> None:
    spec = kubernetes_object("StatefulSet")["spec"]
    assert spec["replicas"] == 3
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    mounts = {
        m["name"]: m["mountPath"]
        for m in statefulset_container(kubernetes_object("StatefulSet"))["volumeMounts"]
    }
    data_dir = PurePosixPath(pod_environment(0)["KVSTORE_DATA_DIR"])
    assert PurePosixPath(mounts[claim["metadata"]["name"]]) in data_dir.parents


def test_services_select_the_pods_and_name_their_ports() -> None:
    statefulset = kubernetes_object("StatefulSet")
    assert statefulset["spec"]["selector"]["matchLabels"] == LABELS
    assert statefulset["spec"]["template"]["metadata"]["labels"] == LABELS
    port_names = {
        p["name"]: p["containerPort"] for p in statefulset_container(statefulset)["ports"]
    }
    peer = kubernetes_object("Service", statefulset["spec"]["serviceName"])
    assert peer["spec"]["clusterIP"] == "None"
    assert peer["spec"]["publishNotReadyAddresses"] is True
    client = kubernetes_object("Service", "kvstore")
    assert client["spec"].get("publishNotReadyAddresses", False) is False
    for service in (peer, client):
        assert service["spec"]["selector"] == LABELS
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
            assert port["port"] == port_names[port["targetPort"]]
    budget = kubernetes_object("PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == LABELS


def test_ports_agree_with_the_listen_addresses() -> None:
    env = pod_environment(0)
    ports = {
        p["name"]: p["containerPort"]
        for p in statefulset_container(kubernetes_object("StatefulSet"))["ports"]
    }
    assert env["KVSTORE_LISTEN_CLIENT"].endswith(f":{ports['client']}")
    assert env["KVSTORE_LISTEN_PEER"].endswith(f":{ports['peer']}")
    assert int(env["KVSTORE_PEER_PORT"]) == ports["peer"]


def test_probes_and_graceful_shutdown() -> None:
    pod = kubernetes_object("StatefulSet")["spec"]["template"]["spec"]
    container = statefulset_container(kubernetes_object("StatefulSet"))
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "client"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "client"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # Room for the preStop pause, a leadership transfer and draining in-flight requests.
    config = load_serve_config(pod_environment(0))
    transfer_s = config.shutdown_transfer_ms / 1000 + config.request_timeout_ms / 1000
    assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + transfer_s + 10


def test_pod_hardening_and_placement() -> None:
    pod = kubernetes_object("StatefulSet")["spec"]["template"]["spec"]
    container = statefulset_container(kubernetes_object("StatefulSet"))
    assert pod["enableServiceLinks"] is False  # would inject KVSTORE_PORT=tcp://... otherwise
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for constraint in pod["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"] == LABELS


def test_statefulset_mode_settings_match_the_manifest() -> None:
    statefulset = kubernetes_object("StatefulSet")
    env = pod_environment(1, namespace="prod")
    assert "KVSTORE_ID" not in env and "KVSTORE_PEERS" not in env
    assert int(env["KVSTORE_STATEFULSET_REPLICAS"]) == statefulset["spec"]["replicas"]
    assert env["KVSTORE_PEER_SERVICE"] == statefulset["spec"]["serviceName"]
    assert env["KVSTORE_HOSTNAME"] == "kvstore-1"
    assert env["KVSTORE_ADVERTISE_CLIENT_URL"] == "http://kvstore-1.kvstore-peer.prod.svc:7001"


def test_every_variable_is_one_kvstore_reads() -> None:
    # `kvstore serve` reads the settings; the CLI in the same container reads its endpoints.
    known = serve_environment_names() | cli_environment_names()
    container = statefulset_container(kubernetes_object("StatefulSet"))
    set_names = set(pod_environment(0))
    assert {n for n in set_names if n.startswith("KVSTORE_")} <= known
    # Anything else only feeds a $(VAR) reference.
    referenced = set().union(*(references(str(e.get("value", ""))) for e in container["env"]))
    assert {n for n in set_names if not n.startswith("KVSTORE_")} <= referenced
    assert not re.search(r"\$\(", "".join(pod_environment(0).values()))


def test_cli_endpoints_are_every_pod_on_the_client_port() -> None:
    env = pod_environment(0)
    config = load_serve_config(env)
    client_port = env["KVSTORE_LISTEN_CLIENT"].rpartition(":")[2]
    expected = [
        f"http://{address.rpartition(':')[0]}:{client_port}"
        for _, address in sorted(config.peer_addresses.items())
    ]
    assert env["KVSTORE_ENDPOINTS"].split(",") == expected


@pytest.mark.parametrize("ordinal", [0, 1, 2])
def test_kvstore_serve_derives_identity_from_the_pod(ordinal: int) -> None:
    config = load_serve_config(pod_environment(ordinal))
    assert config.id == ordinal + 1
    assert config.peer_addresses == {i + 1: f"kvstore-{i}.kvstore-peer:7101" for i in range(3)}
    assert config.client_url == f"http://kvstore-{ordinal}.kvstore-peer.default.svc:7001"
    assert str(config.data_dir) == "/var/lib/kvstore/data"
    assert config.listen_client == "0.0.0.0:7001"
    assert config.initial_cluster_state == "auto"  # bootstraps only with every peer fresh


@pytest.mark.parametrize("ordinal", [3, 4])
def test_a_pod_added_by_scaling_up_joins(ordinal: int) -> None:
    """`kubectl scale --replicas=5` starts kvstore-3 and kvstore-4 with the same template:
    they must join the cluster (as learners the leader promotes), never bootstrap one."""
    config = load_serve_config(pod_environment(ordinal))
    assert config.id == ordinal + 1
    assert config.initial_cluster_state == "existing"
    own = f"kvstore-{ordinal}.kvstore-peer:7101"
    bootstrap = {i + 1: f"kvstore-{i}.kvstore-peer:7101" for i in range(3)}
    assert config.peer_addresses == {**bootstrap, ordinal + 1: own}
