"""Screenshot of the web page while it streams, for the README (``docs/screenshot.png``).

    python scripts/screenshot.py                       # starts its own server
    python scripts/screenshot.py --url http://127.0.0.1:8000/ --pipeline testcard

Without ``--url`` it runs ``supervisor start`` on a free port (loopback only, no STUN) in a
temporary run directory and stops it afterwards. The page loads the pipeline, starts with
Chromium's fake camera (or no input, for a text-to-video pipeline) and is captured once the
output video plays. Needs Debian's ``chromium`` and the ``playwright`` package (``pip install
-e '.[test]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from browser import CHROMIUM_ARGS, ensure_chromium  # noqa: E402
from playwright.sync_api import expect, sync_playwright  # noqa: E402

SERVER_START_TIMEOUT_S = 60
WAIT_MS = 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def own_server() -> Iterator[str]:
    """``supervisor start`` in a temporary run directory; answers its URL."""
    with tempfile.TemporaryDirectory(prefix="dwshot", dir="/tmp") as tmp:
        port = free_port()
        config = Path(tmp) / "dreamwire.toml"
        config.write_text(f'host = "127.0.0.1"\nport = {port}\n[api.ice]\nstun_urls = []\n')
        env = {**os.environ, "DREAMWIRE_RUN_DIR": str(Path(tmp) / "run")}
        log = open(Path(tmp) / "supervisor.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "start", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=log,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + SERVER_START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise SystemExit(
                        f"supervisor exited:\n{(Path(tmp) / 'supervisor.log').read_text()}"
                    )
                try:
                    with urllib.request.urlopen(f"{url}health", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the server did not answer in time") from None
                    time.sleep(0.2)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
            log.close()


def capture(url: str, pipeline: str, out: Path, width: int, height: int) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(ensure_chromium()), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": width, "height": height})
        page.set_default_timeout(WAIT_MS)
        page.goto(url)
        page.wait_for_selector("body[data-ready]")
        page.select_option("#pipeline-select", pipeline)
        page.click("#load")
        expect(page.locator("#load-status")).to_have_text("Loaded")
        page.click("#start")
        expect(page.locator("#stream-pill")).to_have_text("live")
        # Playing, with the readout filled in (stats arrive once a second).
        page.wait_for_function(
            """() => document.querySelector("#output").currentTime > 2
                && document.querySelector("#readout-rtt").textContent.endsWith("ms")"""
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--pipeline", default="passthrough")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshot.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args()
    if args.url:
        capture(args.url, args.pipeline, args.out, args.width, args.height)
    else:
        with own_server() as url:
            capture(url, args.pipeline, args.out, args.width, args.height)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
