"""`kvstore get|put|cas|delete|list|status` with a scripted transport: output and exit codes."""

from __future__ import annotations

import base64
import functools
import json
import subprocess
from pathlib import Path

import pytest

from kvstore import cli, client_cli
from kvstore.client import Client
from kvstore.client.transport import HttpResponse

from .fakes import ScriptedTransport, SentRequest, error_response, json_response, put_ok


def handler(request: SentRequest) -> HttpResponse:
    if request.path == "/v1/kv/missing":
        return error_response(404, "not_found")
    if request.method == "PUT" and request.headers.get("If-Match") == "1":
        return error_response(412, "precondition_failed", extra={"current_revision": 7})
    if request.method == "PUT":
        assert request.body == b"hello"
        return put_ok(request.path.rsplit("/", 1)[1], 8)
    if request.method == "DELETE":
        return json_response(200, {"key": "k", "revision": 9, "deleted": True})
    if request.path == "/v1/kv":
        items = [{"key": "p/a", "value": base64.b64encode(b"1").decode(), "create_revision": 1,
                  "mod_revision": 1, "version": 1}]  # fmt: skip
        return json_response(200, {"revision": 9, "items": items, "more": False})
    if request.path == "/v1/status":
        return json_response(200, {"id": 1, "role": "leader", "term": 2, "leader_id": 1})
    return HttpResponse(200, {"kvstore-mod-revision": "8", "kvstore-revision": "9"}, b"hello")


@pytest.fixture(autouse=True)
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        client_cli, "Client", functools.partial(Client, transport=ScriptedTransport(handler))
    )


def run(*argv: str) -> int:
    return cli.main([*argv, "--endpoints", "http://127.0.0.1:7001"])


def test_put_then_get(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("put", "k", "hello") == 0
    assert capsys.readouterr().out == "OK revision=8 mod_revision=8 version=1\n"
    assert run("get", "k") == 0
    assert capsys.readouterr().out == "hello\n"
    assert run("get", "k", "--json") == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["value"] == "hello" and answer["mod_revision"] == 8


def test_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("get", "missing") == client_cli.EXIT_NOT_FOUND
    assert "not_found" in capsys.readouterr().err
    assert run("cas", "k", "hello", "--mod-revision", "1") == client_cli.EXIT_PRECONDITION_FAILED
    assert run("cas", "k", "hello", "--mod-revision", "1", "--json") == 3
    assert json.loads(capsys.readouterr().out)["current_revision"] == 7
    assert run("cas", "k", "hello", "--create") == 0
    with pytest.raises(SystemExit):
        run("cas", "k", "hello")  # neither --mod-revision nor --create


def test_delete_list_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("delete", "k") == 0
    assert capsys.readouterr().out == "OK revision=9\n"
    assert run("list", "p/") == 0
    assert capsys.readouterr().out == "p/a\t1\n"
    assert run("status") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED"]
    assert table[1].split()[:3] == ["http://127.0.0.1:7001", "1", "leader"]


def test_default_endpoints_are_the_local_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(client_cli.ENDPOINTS_ENV, raising=False)
    parser = cli.build_parser()
    assert parser.parse_args(["get", "k"]).endpoints == client_cli.DEFAULT_ENDPOINTS


def test_options_may_stand_between_positional_arguments(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`kvstore put k --json v` puts v (argparse alone read `v` as an unknown argument)."""
    assert cli.main(["put", "k", "--json", "hello", "--endpoints", "http://127.0.0.1:7001"]) == 0
    assert json.loads(capsys.readouterr().out)["succeeded"] is True
    argv = ["get", "--json", "k", "--timeout", "2", "--endpoints", "http://127.0.0.1:7001"]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["value"] == "hello"


@pytest.mark.parametrize(
    ("option", "value", "complaint"),
    [
        ("--timeout", "0", "--timeout"),
        ("--timeout", "-1", "--timeout"),
        ("--timeout", "nan", "--timeout"),
        ("--endpoints", "", "--endpoints"),
        ("--endpoints", "ftp://127.0.0.1:7001", "http"),
        ("--endpoints", "http://127.0.0.1:7001,,", "empty"),
        ("--endpoints", "http://:7001", "host"),
    ],
)
def test_bad_arguments_are_usage_errors(
    option: str, value: str, complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad --timeout or --endpoints is a usage error (exit 2) naming the option, not a
    request that fails (exit 5) or is retried until the deadline (exit 4)."""
    with pytest.raises(SystemExit) as stop:
        cli.main(["get", "k", option, value])
    assert stop.value.code == 2
    assert complaint in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.startswith("kvstore ")


def test_errors_say_what_matters_once(capsys: pytest.CaptureFixture[str]) -> None:
    """The message names the key and, for a failed precondition, the current revision; the
    error code appears once, not repeated by every layer."""
    assert run("get", "missing") == client_cli.EXIT_NOT_FOUND
    err = capsys.readouterr().err
    assert "missing" in err and err.count("not_found") <= 1
    assert run("cas", "k", "hello", "--mod-revision", "1") == client_cli.EXIT_PRECONDITION_FAILED
    err = capsys.readouterr().err
    assert "current revision 7" in err and err.count("precondition_failed") <= 1


def test_output_json_is_the_same_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("get", "k", "--output", "json") == 0
    assert json.loads(capsys.readouterr().out)["value"] == "hello"
    assert run("status", "-o", "json") == 0
    assert "http://127.0.0.1:7001" in json.loads(capsys.readouterr().out)


def test_bash_completion_offers_subcommands_and_their_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The script comes from the parser, so it lists exactly what the parser accepts."""
    assert cli.main(["completion", "bash"]) == 0
    script = tmp_path / "kvstore.bash"
    script.write_text(capsys.readouterr().out)

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        program = (
            f"source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _kvstore; "
            'echo "${COMPREPLY[@]}"'
        )
        result = subprocess.run(["bash", "-c", program], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout.split()

    assert complete("kvstore", "sta") == ["status"]
    assert complete("kvstore", "put", "--if") == ["--if-revision"]
    assert "--nodes" in complete("kvstore", "cluster", "--")


def test_member_remove_by_name_needs_exactly_one_member_of_that_name() -> None:
    """`kvstore member remove --name N` (deploy/README.md's scale-down): the id of the one
    member named N; none, or two (the old and new holder during a replacement), refused."""
    from kvstore.member_cli import _member_named

    document = {
        "members": {
            "1": {"name": "1"},
            "4": {"name": "2"},  # took slot 2 over after a lost disk
            "5": {"name": "4"},
            "6": {"name": "5"},
            "7": {"name": "5"},  # slot 5 being replaced
        }
    }
    assert _member_named(document, "2") == 4
    assert _member_named(document, "4") == 5
    with pytest.raises(ValueError, match="no member is named '3'"):
        _member_named(document, "3")
    with pytest.raises(ValueError, match="members 6, 7 are all named '5'"):
        _member_named(document, "5")
