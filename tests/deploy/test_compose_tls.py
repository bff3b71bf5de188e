"""deploy/compose.tls.yaml: the Compose override that turns TLS on with mounted files. Merged
over compose.yaml as `docker compose -f compose.yaml -f compose.tls.yaml` merges it, each
node's settings are ones `kvstore serve` accepts, with its own certificate on both ports."""

from __future__ import annotations

import yaml

from tests.deploy.deployfiles import (
    DEPLOY,
    compose_environment,
    compose_file,
    load_serve_config,
    serve_environment_names,
)


def _override() -> dict:
    with (DEPLOY / "compose.tls.yaml").open() as file:
        document: dict = yaml.safe_load(file)
    return document


def test_every_node_gets_its_own_certificate_on_both_ports() -> None:
    base = compose_file()["services"]
    for index, (name, service) in enumerate(sorted(_override()["services"].items()), start=1):
        env = {**compose_environment(base[name]), **compose_environment(service)}
        assert set(env) <= serve_environment_names()
        config = load_serve_config(env)
        assert config.id == index and config.peer_tls and config.client_tls
        assert config.cert_file == config.peer_cert_file == f"/etc/kvstore/tls/node{index}.pem"
        assert config.client_url == f"https://127.0.0.1:{7000 + index}"
        mounts = [volume.split(":") for volume in service["volumes"]]
        assert ["./certs", "/etc/kvstore/tls", "ro"] in mounts
        assert "https://127.0.0.1:7001/healthz" in " ".join(service["healthcheck"]["test"])
