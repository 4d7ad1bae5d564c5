"""Command-line answers people hit: a clear message and exit code, never a traceback (real processes
against the suite's Redis)."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest

from dpiguard.demo.runner import write_demo_config
from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


def dpiguard(*argv, stdin=subprocess.DEVNULL, input=None, env=None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "dpiguard.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=90, stdin=None if input is not None else stdin, input=input,
                          env=None if env is None else dict(os.environ, **env))


def no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


@pytest.fixture
def config(tmp_path, redis_url, r) -> str:
    path = write_demo_config(tmp_path, host="127.0.0.1", port=free_port(), upstream_port=free_port(),
                             redis_url=redis_url)
    assert dpiguard("keys", "init", "--config", str(path)).returncode == 0
    return str(path)


def test_users_add_without_a_terminal_says_to_use_password_stdin(config):
    result = dpiguard("users", "add", "inf.new", "--role", "nurse", "--config", config)  # stdin: /dev/null
    assert result.returncode == 1 and "no terminal" in result.stderr and "--password-stdin" in result.stderr
    no_traceback(result)
    ok = dpiguard("users", "add", "inf.new", "--role", "nurse", "--password-stdin", "--config", config,
                  input="Un-Mot-De-Passe-Long-2026!\n")
    assert ok.returncode == 0, ok.stderr


def test_an_unknown_role_is_refused_against_categories_yaml(config):
    result = dpiguard("users", "add", "inf.x", "--role", "infirmiere", "--password-stdin", "--config", config,
                      input="Un-Mot-De-Passe-Long-2026!\n")
    assert result.returncode == 1 and "unknown role 'infirmiere'" in result.stderr and "nurse" in result.stderr
    no_traceback(result)
    assert "inf.x" not in dpiguard("users", "list", "--config", config).stdout
    assert dpiguard("users", "add", "inf.x", "--role", "nurse", "--password-stdin", "--config", config,
                    input="Un-Mot-De-Passe-Long-2026!\n").returncode == 0
    result = dpiguard("users", "set-roles", "inf.x", "--role", "nurse", "--role", "chirurgien", "--config", config)
    assert result.returncode == 1 and "unknown role 'chirurgien'" in result.stderr


def test_import_stays_refuses_an_unknown_unit(config, tmp_path):
    members = tmp_path / "members.csv"
    members.write_text("login,unit\ninf.a,CARDIO\n")
    stays = tmp_path / "stays.csv"
    stays.write_text("patient,unit,start\nP1,CARDIO,2026-03-01\nP2,CARDO,2026-03-01\nP3,URG,2026-03-01\n")
    result = dpiguard("import", "stays", str(stays), "--config", config)
    assert result.returncode == 1 and "unknown unit 'CARDIO'" in result.stderr  # no member yet
    assert dpiguard("import", "members", str(members), "--config", config).returncode == 0
    result = dpiguard("import", "stays", str(stays), "--config", config)
    assert result.returncode == 1 and f"{stays}:3: column 'unit': unknown unit 'CARDO'" in result.stderr
    assert "CARDIO" not in result.stderr.replace("CARDO", "")  # CARDIO (members) and URG (declared) are known
    assert "nothing imported" in result.stdout
    no_traceback(result)
    stays.write_text("patient,unit,start\nP1,CARDIO,2026-03-01\nP3,URG,2026-03-01\n")
    assert dpiguard("import", "stays", str(stays), "--config", config).returncode == 0


def test_careteam_show_gives_stay_ids_and_readable_times_and_stay_end_takes_a_unit(config):
    assert dpiguard("careteam", "stay-add", "P0042", "CARDIO", "--start", "2026-03-01T08:30", "--config",
                    config).returncode == 0
    shown = orjson.loads(dpiguard("careteam", "show", "--patient", "P0042", "--config", config).stdout)
    stay = shown["stays"][0]
    assert stay["id"].startswith("S") and stay["unit"] == "CARDIO" and stay["end"] is None
    start = datetime.fromisoformat(stay["start"])  # ISO 8601, in the configuration's zone (adt.timezone)
    assert stay["start"] == "2026-03-01T09:30:00+01:00"  # --start is read as UTC; Paris is UTC+1 in March
    assert start == datetime(2026, 3, 1, 8, 30, tzinfo=timezone.utc)
    assert isinstance(shown["now"], str) and datetime.fromisoformat(shown["now"])
    result = dpiguard("careteam", "stay-end", "P0042", "--config", config)
    assert result.returncode == 1 and "--unit" in result.stderr and "careteam show" in result.stderr
    result = dpiguard("careteam", "stay-end", "P0042", "--unit", "PNEUMO", "--config", config)
    assert result.returncode == 1 and "no open stay in PNEUMO" in result.stderr
    result = dpiguard("careteam", "stay-end", "P0042", "--unit", "cardio", "--config", config)
    assert result.returncode == 0 and stay["id"] in result.stdout, result.stderr
    shown = orjson.loads(dpiguard("careteam", "show", "--patient", "P0042", "--config", config).stdout)
    assert shown["stays"][0]["end"] is not None


def test_dpiguard_run_on_a_busy_port_fails_before_saying_listening(config):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = dpiguard("run", "--config", config, env={"DPIGUARD_LISTEN__PORT": str(port)})
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "listen.port" in result.stderr
    assert "listening" not in result.stdout
    no_traceback(result)


def test_the_demo_on_busy_ports_says_to_use_port(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = dpiguard("demo", "--port", str(port - 1), "--dir", str(tmp_path / "demo"))  # port-1 and port
    assert result.returncode != 0 and "--port" in result.stderr and f"{port}" in result.stderr
    no_traceback(result)
