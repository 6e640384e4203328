"""bsmamba2-serve's arguments: each bad one is named before any model work."""

from __future__ import annotations

import socket

import pytest

from bsmamba2_jax.serve import cli

pytest.importorskip("uvicorn", reason="bsmamba2-serve needs the [serve] extra: "
                                      "pip install -e '.[serve]'")


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.msgpack"
    path.write_bytes(b"never read: every case fails before the model loads")
    return str(path)


@pytest.mark.parametrize("args,says", [
    (["--port", "70000"], "--port 70000 must be in 0..65535"),
    (["--max-upload-mb", "0"], "--max-upload-mb 0 must be a positive number"),
    (["--ttl-minutes", "nan"], "--ttl-minutes nan must be a positive number"),
    (["--format", "mp3"], "argument --format: invalid choice: 'mp3'"),
])
def test_bad_arguments_name_the_flag(capsys, model_file, args, says):
    with pytest.raises(SystemExit) as e:
        cli.main(["--checkpoint", model_file] + args)
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_no_model_and_a_missing_model_are_named(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("BSMAMBA2_MODEL", raising=False)
    with pytest.raises(SystemExit):
        cli.main([])
    assert "no model: pass --checkpoint MODEL_FILE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--checkpoint", str(tmp_path / "missing.msgpack")])
    assert "missing.msgpack: no such file or folder" in capsys.readouterr().err


def test_a_port_in_use_is_an_error_before_the_model_loads(capsys, model_file):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            cli.main(["--checkpoint", model_file, "--port", str(port)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"--host 127.0.0.1 --port {port}: cannot listen there" in err
    assert "--port 0 for any free one" in err


def test_listen_says_whether_only_this_machine_can_connect():
    for host, loopback in (("127.0.0.1", True), ("localhost", True), ("0.0.0.0", False)):
        sock, only_here = cli.listen(host, 0)
        sock.close()
        assert only_here is loopback, host
