"""DNS rebinding: a request must name this server by a name it knows (``signalling.api.hosts``).

In one process, the rule; against ``supervisor start``, reads and writes with a foreign Host
refused while loopback names work; and in Chromium, a page on a name re-pointed at 127.0.0.1
(a resolver rule: what a rebinding attacker's DNS does) cannot read the log or the ICE servers.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests
from conftest import SupervisorRun

from signalling.api.hosts import host_allowed, split_host

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[api.ice]
stun_urls = []
"""
Start = Callable[..., SupervisorRun]


@pytest.mark.parametrize(
    ("host", "loopback_bind", "allowed"),
    [
        ("127.0.0.1:8000", True, True),
        ("localhost:8000", True, True),
        ("LOCALHOST", True, True),
        ("app.localhost:5173", True, True),
        ("[::1]:8000", True, True),
        ("evil.example:8000", True, False),
        ("127.0.0.1.evil.example", True, False),
        ("localhost.evil.example", True, False),
        ("192.168.1.20:8000", True, False),  # a loopback bind has no other address
        ("192.168.1.20:8000", False, True),  # a public bind: any address (no rebinding)
        ("gpu.example.com", False, False),
        ("", True, False),
    ],
)
def test_the_rule(host: str, loopback_bind: bool, allowed: bool) -> None:
    assert host_allowed(host, [], loopback_bind) is allowed


def test_configured_names() -> None:
    assert host_allowed("gpu.example.com:8000", ["gpu.example.com"], False)
    assert host_allowed("a.studio.example", [".studio.example"], True)
    assert host_allowed("studio.example", [".studio.example"], True)
    assert not host_allowed("evilstudio.example", [".studio.example"], True)
    assert host_allowed("anything", ["*"], True)
    assert split_host("[::1]:8000") == "::1" and split_host("Example.COM.:80") == "example.com"


def test_a_foreign_host_reads_and_writes_nothing(start_supervisor: Start) -> None:
    server = start_supervisor(CONFIG)
    base = f"http://127.0.0.1:{server.port}"
    reads = ["/api/v1/logs/tail", "/api/v1/webrtc/ice-servers", "/api/v1/metrics", "/health", "/"]
    for path in reads:
        refused = requests.get(base + path, headers={"Host": "evil.example"}, timeout=10)
        assert refused.status_code == 403, path
        assert refused.json()["error"] == "host_not_allowed"
        assert "evil.example" not in requests.get(base + path, timeout=10).text[:0]  # (no echo)
        for name in ("localhost", f"127.0.0.1:{server.port}", f"localhost:{server.port}"):
            assert requests.get(base + path, headers={"Host": name}, timeout=10).status_code in (
                200,
                503,
            ), (path, name)
    write = requests.post(
        base + "/api/v1/pipeline/load",
        json={"pipeline_id": "passthrough"},
        headers={"Host": "evil.example", "Origin": "http://evil.example"},
        timeout=10,
    )
    assert write.status_code == 403 and write.json()["error"] == "host_not_allowed"
    status = requests.get(base + "/api/v1/pipeline/status", timeout=10).json()
    assert status["status"] == "not_loaded"  # the write changed nothing
    assert "refused a request for host 'evil.example'" in server.log()


#: The attacker's script, run in a page of origin http://evil.example:PORT.
ATTACK = """async () => {
  const results = {};
  for (const path of ["/api/v1/logs/tail", "/api/v1/webrtc/ice-servers", "/api/v1/metrics"]) {
    try {
      const r = await fetch(path);
      results[path] = {status: r.status, body: (await r.text()).slice(0, 300)};
    } catch (e) { results[path] = {error: String(e)}; }
  }
  return results;
}"""


def test_a_rebound_page_in_chromium_reads_nothing(start_supervisor: Start) -> None:
    from browser import CHROMIUM_ARGS, ensure_chromium
    from playwright.sync_api import sync_playwright

    server = start_supervisor(CONFIG)
    page_url = f"http://evil.example:{server.port}/"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(ensure_chromium()),
            # What the attacker's DNS does once the page is open: its name now means 127.0.0.1.
            args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP evil.example 127.0.0.1"],
            headless=True,
        )
        try:
            page = browser.new_page()
            page.goto(page_url)  # a document of origin http://evil.example:PORT
            assert page.evaluate("location.origin") == page_url.rstrip("/")
            results = page.evaluate(ATTACK)
        finally:
            browser.close()
    assert set(results) == {"/api/v1/logs/tail", "/api/v1/webrtc/ice-servers", "/api/v1/metrics"}
    for path, result in results.items():
        assert result.get("status") == 403, (path, result)
        assert "host_not_allowed" in result["body"], (path, result)
        assert "INFO" not in result["body"] and "urls" not in result["body"], (path, result)
