"""Listener limits through a real proxy: the header-size limit applies to dpiguard's own prefix too, and
the unauthenticated health answers show no path of the host."""

from __future__ import annotations

import httpx
import orjson
import pytest

from dpiguard.audit.chain import read_records

from .stack import build_stack

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = build_stack(tmp_path_factory.mktemp("listeners"))
    s.start_proxy("a")
    yield s
    s.close()


@pytest.mark.parametrize("path", ["/_dpiguard/login", "/_dpiguard/api/login", "/_dpiguard/health",
                                  "/_dpiguard/health/ready", "/_dpiguard/metrics"])
def test_oversized_headers_are_refused_under_the_reserved_prefix_too(stack, path):
    proxy = stack.proxies[0]
    r = httpx.get(f"{proxy.url}{path}", headers={"x-padding": "a" * 20000}, timeout=10)
    assert r.status_code == 431, (path, r.status_code, r.text[:200])
    records = [x for x in read_records(stack.audit_path / "a") if x.get("reason") == "header_too_large"
               and (x.get("path") or "").startswith("/_dpiguard")]
    assert records  # traced like every refusal


def test_an_oversized_url_under_the_prefix_is_refused(stack):
    proxy = stack.proxies[0]
    r = httpx.get(f"{proxy.url}/_dpiguard/login?x=" + "a" * 9000, timeout=10)
    assert r.status_code == 414


def test_health_answers_show_no_local_path(stack):
    proxy = stack.proxies[0]
    folders = {str(stack.workdir), str(stack.audit_path), str(stack.workdir.resolve())}
    for path in ("/_dpiguard/health", "/_dpiguard/health/ready", "/_dpiguard/health/live"):
        r = httpx.get(f"{proxy.url}{path}", timeout=10)
        text = r.text
        assert not any(folder in text for folder in folders), (path, text)
        assert '"/' not in text and ": '/" not in text, (path, text)  # no absolute path at all
    health = orjson.loads(httpx.get(f"{proxy.url}/_dpiguard/health", timeout=10).content)
    assert health["audit"]["chain"] == "a" and health["audit"]["writable"] is True
