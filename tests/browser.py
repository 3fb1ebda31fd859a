"""Debian's Chromium driven by Playwright: where it is, how it is installed, how it is launched.

Playwright cannot download its own browsers here, so it drives the system's ``chromium``
(``apt-get install -y chromium``). ``ensure_chromium()`` installs it when it is missing and the
process may (root with apt-get), else fails naming the command. ``DREAMWIRE_CHROMIUM`` points
at another Chromium-based browser (a laptop's Chrome, say).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM_PATH = Path(os.environ.get("DREAMWIRE_CHROMIUM", "/usr/bin/chromium"))
INSTALL_COMMAND = ["apt-get", "install", "-y", "chromium"]
INSTALL_TIMEOUT_S = 900

CHROMIUM_ARGS = [
    # A fake camera (a moving test pattern) and no permission prompt.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    # Off the network: no updates, no sync, no QUIC probing.
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # Containers: no user namespaces for the sandbox, no GPU.
    "--no-sandbox",
    "--disable-gpu",
    # A page in a background tab still plays and sends.
    "--autoplay-policy=no-user-gesture-required",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
]


def ensure_chromium() -> Path:
    """The Chromium executable, installed with apt-get first when missing and possible."""
    if CHROMIUM_PATH.exists():
        return CHROMIUM_PATH
    if os.geteuid() == 0 and shutil.which("apt-get") and "DREAMWIRE_CHROMIUM" not in os.environ:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=True, env=env, timeout=INSTALL_TIMEOUT_S)
        subprocess.run(INSTALL_COMMAND, check=True, env=env, timeout=INSTALL_TIMEOUT_S)
        if CHROMIUM_PATH.exists():
            return CHROMIUM_PATH
    raise RuntimeError(
        f"Chromium is not at {CHROMIUM_PATH}: install it with `sudo {' '.join(INSTALL_COMMAND)}` "
        "or set DREAMWIRE_CHROMIUM to a Chromium-based browser"
    )
