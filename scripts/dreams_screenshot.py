"""Screenshot of the Dreams viewer page while it streams, for the README (``docs/dreams.png``).

    python scripts/dreams_screenshot.py                       # starts its own server
    python scripts/dreams_screenshot.py --generator pipeline:dream --models-dir ~/models
    python scripts/dreams_screenshot.py --url http://127.0.0.1:8000/dreams

Without ``--url`` it runs ``supervisor start`` on a free port (loopback only, no STUN, no media
stages) in a temporary run directory, with the Dreams launcher in local mode running
``--generator`` (default ``testcard``, the worker's built-in pattern; ``pipeline:<id>`` runs a
text-mode inference pipeline), and stops it afterwards. Opening ``/dreams`` wakes the worker;
the page is captured once frames are drawn and its status and frame-rate lines are filled in.
Needs Debian's ``chromium`` and the ``playwright`` package (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
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
from playwright.sync_api import sync_playwright  # noqa: E402

SERVER_START_TIMEOUT_S = 60
SERVER_STOP_TIMEOUT_S = 30
WAIT_MS = 60_000  # a worker that loads a pipeline takes a while to send its first frame

# A frame is on the canvas (not the page's black), the hub says frames flow, and the page has
# measured its frame rate (every 2 s).
FRAMES_SHOWN = """() => {
    const canvas = document.getElementById('dream-canvas');
    const ctx = canvas.getContext('2d');
    const {data} = ctx.getImageData(0, 0, canvas.width, canvas.height);
    let lit = 0;
    for (let i = 0; i < data.length; i += 4 * 97) lit += data[i] + data[i + 1] + data[i + 2] > 60;
    const status = document.getElementById('status').textContent;
    const fps = document.getElementById('fps').textContent;
    return lit > 100 && status.startsWith('Dreams flowing') && /^[1-9][0-9.]* fps$/.test(fps);
}"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_config(port: int, generator: str, worker_args: list[str]) -> str:
    return (
        f'host = "127.0.0.1"\nport = {port}\nmedia = false\n'
        "[api.ice]\nstun_urls = []\n"
        '[dreams]\nauth_token = ""\n'
        f"[dreams.launcher]\ngenerator = {json.dumps(generator)}\n"
        f"worker_args = {json.dumps(worker_args)}\n"
    )


@contextlib.contextmanager
def own_server(generator: str, worker_args: list[str]) -> Iterator[str]:
    """``supervisor start`` in a temporary run directory; answers the ``/dreams`` URL."""
    with tempfile.TemporaryDirectory(prefix="dwdream", dir="/tmp") as tmp:
        port = free_port()
        config = Path(tmp) / "dreamwire.toml"
        config.write_text(server_config(port, generator, worker_args))
        env = {**os.environ, "DREAMWIRE_RUN_DIR": str(Path(tmp) / "run")}
        log_path = Path(tmp) / "supervisor.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.cli", "start", "--config", str(config)],
                env=env,
                stdout=log,
                stderr=log,
            )
            base = f"http://127.0.0.1:{port}"
            try:
                deadline = time.monotonic() + SERVER_START_TIMEOUT_S
                while True:
                    if proc.poll() is not None:
                        raise SystemExit(f"supervisor exited:\n{log_path.read_text()}")
                    try:  # health does not wake the generator
                        with urllib.request.urlopen(f"{base}/api/dreams/health", timeout=1):
                            break
                    except OSError:
                        if time.monotonic() > deadline:
                            raise SystemExit("the server did not answer in time") from None
                        time.sleep(0.2)
                yield f"{base}/dreams"
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(SERVER_STOP_TIMEOUT_S)


def capture(url: str, out: Path, width: int, height: int) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(ensure_chromium()), args=CHROMIUM_ARGS, headless=True
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(WAIT_MS)
            page.goto(url)
            page.wait_for_function(FRAMES_SHOWN, polling=250)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
        finally:
            browser.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="the /dreams page of a running server (default: start one)")
    parser.add_argument(
        "--generator", default="testcard", help="worker generator: testcard or pipeline:<id>"
    )
    parser.add_argument("--models-dir", help="models directory of a pipeline:<id> generator")
    parser.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="extra `supervisor worker` argument (repeatable), e.g. --worker-arg=--texture=10",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dreams.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=800)
    args = parser.parse_args()
    if args.url:
        capture(args.url, args.out, args.width, args.height)
    else:
        worker_args = list(args.worker_arg)
        if args.models_dir:
            worker_args += ["--models-dir", args.models_dir]
        with own_server(args.generator, worker_args) as url:
            capture(url, args.out, args.width, args.height)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
