"""The web page at ``/`` in a real browser (Debian's Chromium through Playwright, fake camera),
against a server started with ``supervisor start``.

Waits are on page conditions (``wait_for_function``, ``expect``) or on the server's counts
(``wait_until``); nothing sleeps to synchronise. Each test leaves a screenshot of its page in
``artifacts/`` (git-ignored); the streaming test also keeps one at laptop and one at phone width.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from browser import CHROMIUM_ARGS, ensure_chromium
from conftest import SupervisorRun, wait_until
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
STATIC = ROOT / "signalling" / "static"
CONFIG = """
[api.ice]
stun_urls = []
"""
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 30_000
NUMBER = re.compile(r"^\d+(\.\d)?$")
MILLISECONDS = re.compile(r"^\d+ ms$")

Start = Callable[..., SupervisorRun]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = ensure_chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(executable), args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        browser.close()


@pytest.fixture
def server(start_supervisor: Start) -> SupervisorRun:
    return start_supervisor(CONFIG)


@contextmanager
def open_page(
    browser: Browser, url: str, request: pytest.FixtureRequest, fake: FakeApi | None = None
) -> Iterator[Page]:
    """A fresh browser context on ``url``; its screenshot and console log go to artifacts/."""
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    console: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        console.append(f"{msg.type}: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    if fake is not None:
        page.route("**/*", fake.handle)
    page.goto(url)
    page.wait_for_selector("body[data-ready]")
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    name = request.node.name.replace("[", "-").replace("]", "")
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    (ARTIFACTS / f"{name}.console.txt").write_text("\n".join(console))
    context.close()
    # The page's own code must not have thrown.
    assert not [line for line in console if line.startswith("pageerror")], console


@pytest.fixture
def page(browser: Browser, server: SupervisorRun, request: pytest.FixtureRequest) -> Iterator[Page]:
    with open_page(browser, f"http://127.0.0.1:{server.port}/", request) as page:
        yield page


class FakeApi:
    """The page's files from disk and a scripted API, for what a real server cannot easily
    show (a pipeline nobody wrote, a download, a failed load)."""

    ORIGIN = "http://dreamwire.test"

    def __init__(self, schemas: dict[str, Any]) -> None:
        self.schemas = schemas
        self.status: dict[str, Any] = {"status": "not_loaded"}
        self.models: dict[str, Any] = {"downloaded": False, "progress": None}

    def handle(self, route: Route) -> None:
        path = urlsplit(route.request.url).path
        if path == "/":
            route.fulfill(path=STATIC / "index.html")
        elif path.startswith("/static/"):
            route.fulfill(path=STATIC / path.removeprefix("/static/"))
        elif path == "/api/v1/pipelines/schemas":
            route.fulfill(json=self.schemas)
        elif path == "/api/v1/pipeline/status":
            route.fulfill(json=self.status)
        elif path == "/api/v1/pipeline/load":
            route.fulfill(json={"message": "Pipeline loading initiated successfully"})
        elif path == "/api/v1/models/status":
            route.fulfill(json=self.models)
        elif path == "/api/v1/models/download":
            route.fulfill(json={"message": "Model download started"})
        else:
            route.fulfill(status=404, json={"error": "not_found", "detail": path})


def posting(path: str) -> Callable[[Request], bool]:
    return lambda request: request.method == "POST" and urlsplit(request.url).path == path


# ---------------------------------------------------------------- helpers


def load(page: Page, pipeline_id: str) -> None:
    page.select_option("#pipeline-select", pipeline_id)
    page.click("#load")
    expect(page.locator("#load-status")).to_have_text("Loaded")


def output_time(page: Page) -> float:
    return float(page.evaluate("document.querySelector('#output').currentTime"))


def wait_playing(page: Page, width: int | None = None) -> None:
    """The output video is live and its time advances (by half a second from now)."""
    expect(page.locator("#stream-pill")).to_have_text("live")
    start = output_time(page)
    page.wait_for_function(
        """([t, w]) => {
          const v = document.querySelector("#output");
          return v.currentTime > t + 0.5 && v.videoWidth > 0 && (w === null || v.videoWidth === w);
        }""",
        arg=[start, width],
    )


def stream_passthrough(page: Page) -> None:
    load(page, "passthrough")
    page.click("#start")
    wait_playing(page, width=512)


def frames(server: SupervisorRun) -> dict[str, int]:
    return {s.name: s.frames_done for s in server.status().services}


# ---------------------------------------------------------------- tests


def test_camera_stream_plays_and_server_counts_frames(page: Page, server: SupervisorRun) -> None:
    stream_passthrough(page)
    assert page.evaluate("document.querySelector('#output').videoHeight") == 512
    wait_until(lambda: server.service("encode").frames_done >= 30, 10, "encode's count")
    # The readout fills in: frames per second, size, round-trip time over the data channel.
    expect(page.locator("#readout-size")).to_have_text("512×512")
    expect(page.locator("#readout-fps")).to_have_text(NUMBER)
    expect(page.locator("#readout-rtt")).to_have_text(MILLISECONDS)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web_page_streaming_1280.png"))
    page.set_viewport_size(PHONE)
    page.screenshot(path=str(ARTIFACTS / "web_page_streaming_390.png"), full_page=True)
    # Nothing of the page is wider than the phone's screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


def test_setting_change_reaches_server(page: Page, server: SupervisorRun) -> None:
    stream_passthrough(page)
    paused = page.locator('[data-param="paused"] input')
    paused.check()
    snap: dict[str, int] = {}

    def paused_while_decode_runs() -> bool:
        # Paused: inference finishes nothing while decode keeps decoding the camera.
        now = frames(server)
        if snap and now["inference/passthrough"] == snap["inference/passthrough"]:
            return now["decode"] - snap["decode"] >= 15
        snap.update(now)
        return False

    wait_until(paused_while_decode_runs, 15, "output to pause while input flows")
    paused.uncheck()
    before = frames(server)["inference/passthrough"]
    wait_until(
        lambda: frames(server)["inference/passthrough"] >= before + 15, 15, "output to resume"
    )
    wait_playing(page)


def test_text_to_video_plays(page: Page, server: SupervisorRun) -> None:
    schemas = json.loads(page.evaluate("fetch('/api/v1/pipelines/schemas').then(r => r.text())"))[
        "pipelines"
    ]
    if "testcard" not in schemas:
        pytest.skip("the testcard pipeline is not registered")
    width = schemas["testcard"]["default_width"]
    load(page, "testcard")
    # A no-input pipeline: the page chooses "None" and offers no camera.
    expect(page.locator('input[name="source"][value="none"]')).to_be_checked()
    expect(page.locator('input[name="source"][value="camera"]')).to_be_disabled()
    page.click("#start")
    wait_playing(page, width=width)
    assert page.locator("#input-preview").is_hidden()
    wait_until(
        lambda: server.service("inference/testcard").frames_done >= 30, 10, "testcard frames"
    )
    # A prompt typed on the page reaches the generator: the card's background colour (derived
    # from the prompt) changes in the video that comes back.
    before = background(page)
    page.locator('[data-param="prompts"] textarea').first.fill("a red square")
    page.wait_for_function(
        f"""(before) => {{
          const now = ({BACKGROUND_JS})();
          return now.some((c, i) => Math.abs(c - before[i]) > 24);
        }}""",
        arg=before,
    )
    assert page.locator("#alert").is_hidden()


BACKGROUND_JS = """() => {
  const v = document.querySelector("#output");
  const c = document.createElement("canvas");
  c.width = v.videoWidth;
  c.height = v.videoHeight;
  const g = c.getContext("2d");
  g.drawImage(v, 0, 0);
  return Array.from(g.getImageData(c.width >> 1, c.height - 4, 1, 1).data.slice(0, 3));
}"""


def background(page: Page) -> list[int]:
    """The colour near the bottom middle of the output video's current frame."""
    return list(page.evaluate(BACKGROUND_JS))


def write_clip(path: Path, frames: int = 60) -> Path:
    """A short VP8 WebM clip: a bright square moving over a gradient."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        ramp = np.linspace(0, 255, 320, dtype=np.uint8)
        for i in range(frames):
            rgb = np.zeros((240, 320, 3), np.uint8)
            rgb[..., 0] = ramp
            rgb[..., 2] = ramp[::-1]
            x = (i * 4) % 260
            rgb[90:150, x : x + 60] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_video_file_input_and_start_without_load(
    page: Page, server: SupervisorRun, tmp_path: Path
) -> None:
    clip = write_clip(tmp_path / "clip.webm")
    page.select_option("#pipeline-select", "passthrough")
    page.check('input[name="source"][value="file"]')
    page.set_input_files("#file-input", str(clip))
    # Start loads the pipeline first when it is not loaded.
    page.click("#start")
    wait_playing(page, width=512)
    expect(page.locator("#load-status")).to_have_text("Loaded")
    wait_until(lambda: server.service("decode").frames_done >= 30, 10, "the file's frames")


def test_stop_and_start_again(page: Page, server: SupervisorRun) -> None:
    stream_passthrough(page)
    page.click("#start")  # now labelled Stop
    expect(page.locator("#stream-pill")).to_have_text("idle")
    expect(page.locator("#start .button-label")).to_have_text("Start")
    wait_until(lambda: not server.status().sessions, 10, "the session to close on the server")
    done = server.service("encode").frames_done
    page.click("#start")
    wait_playing(page, width=512)
    wait_until(
        lambda: server.service("encode").frames_done >= done + 30, 10, "frames of the 2nd stream"
    )


def test_inference_killed_shows_error_then_reconnects(page: Page, server: SupervisorRun) -> None:
    stream_passthrough(page)
    pid = server.service("inference/passthrough").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    alert = page.locator("#alert-text")
    expect(alert).to_contain_text("inference/passthrough")
    expect(alert).to_contain_text("SIGKILL")
    # The page reconnects by itself (first retry after 1 s) once the stage is back.
    expect(page.locator("#stream-status")).to_contain_text("Reconnect")
    wait_playing(page, width=512)
    done = server.service("encode").frames_done
    wait_until(
        lambda: server.service("encode").frames_done >= done + 15, 10, "frames after reconnect"
    )


# ---------------------------------------------------------------- the page alone, scripted API

GLOW = {
    "id": "glow",
    "name": "Glow",
    "description": "A pipeline no page code knows about.",
    "supported_modes": ["video", "text"],
    "default_width": 256,
    "default_height": 256,
    "requires_models": True,
    "load_params": ["width", "seed"],
    "config_schema": {
        "type": "object",
        "properties": {
            "width": {
                "type": "integer",
                "minimum": 64,
                "maximum": 1024,
                "multipleOf": 64,
                "default": 256,
            },
            "seed": {
                "type": "integer",
                "minimum": 0,
                "maximum": 4294967295,
                "default": 7,
                "ui": {"order": 9, "category": "configuration", "is_load_param": True},
            },
            "strength": {
                "type": "number",
                "minimum": 0,
                "maximum": 2,
                "default": 0.5,
                "ui": {"order": 2, "category": "configuration", "label": "Strength"},
            },
            "style": {
                "$ref": "#/$defs/Style",
                "default": "ink",
                "ui": {"order": 1, "category": "configuration"},
            },
            "mirror": {
                "type": "boolean",
                "default": True,
                "ui": {"order": 3, "category": "effects"},
            },
            "caption": {
                "type": "string",
                "default": "hi",
                "ui": {"order": 4, "category": "effects", "label": "Caption"},
            },
            "steps": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": 999},
                "default": [700, 500],
                "ui": {"order": 5, "category": "configuration"},
            },
            "internal": {"type": "boolean", "default": False},
        },
        "$defs": {"Style": {"enum": ["neon", "ink", "film"]}},
    },
}


@pytest.fixture
def fake_api() -> FakeApi:
    return FakeApi({"pipelines": {"glow": GLOW}})


@pytest.fixture
def offline_page(
    browser: Browser, fake_api: FakeApi, request: pytest.FixtureRequest
) -> Iterator[Page]:
    with open_page(browser, f"{FakeApi.ORIGIN}/", request, fake_api) as page:
        yield page


def test_settings_render_from_any_schema(offline_page: Page) -> None:
    page = offline_page
    settings = page.locator("#settings")
    # Categories in the order of their first field; fields in ui.order.
    expect(settings.locator(".card-title")).to_have_text(["Settings", "Effects"])
    expect(settings.locator("[data-param]")).to_have_count(5)
    keys = settings.locator("[data-param]").evaluate_all("els => els.map(e => e.dataset.param)")
    assert keys == ["style", "strength", "steps", "mirror", "caption"]
    # enum (through $ref) -> select, bounded number -> slider, boolean -> toggle, string -> text.
    style = settings.locator('[data-param="style"] select')
    expect(style.locator("option")).to_have_text(["neon", "ink", "film"])
    expect(style).to_have_value(json.dumps("ink"))
    slider = settings.locator('[data-param="strength"] input[type="range"]')
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("0", "2")
    expect(settings.locator('[data-param="mirror"] input[role="switch"]')).to_be_checked()
    expect(settings.locator('[data-param="caption"] input[type="text"]')).to_have_value("hi")
    expect(settings.locator('[data-param="steps"] input')).to_have_value("700, 500")
    expect(page.locator('[data-param="internal"]')).to_have_count(0)
    # Load-time settings sit with the Load button: a slider for the width, a number for a seed.
    page.click("#load-settings summary")
    expect(page.locator('#load-fields [data-param="width"] input[type="range"]')).to_have_attribute(
        "step", "64"
    )
    expect(page.locator('#load-fields [data-param="seed"] input[type="number"]')).to_have_value("7")
    # Video and no-input modes: all three sources offered.
    expect(page.locator('input[name="source"]:disabled')).to_have_count(0)


def test_download_progress_and_load_error(offline_page: Page, fake_api: FakeApi) -> None:
    page = offline_page
    expect(page.locator("#models-text")).to_contain_text("not downloaded")
    with page.expect_request(posting("/api/v1/models/download")) as download:
        page.click("#download")
    assert download.value.post_data_json == {"pipeline_id": "glow"}
    fake_api.models = {
        "downloaded": False,
        "progress": {"state": "downloading", "percentage": 40.0, "current_file": "unet.bin"},
    }
    expect(page.locator("#download-detail")).to_have_text("40% · unet.bin")
    expect(page.locator("#download-bar")).to_have_attribute("style", re.compile("width: 40%"))
    fake_api.models = {"downloaded": True, "progress": {"state": "done", "percentage": 100.0}}
    expect(page.locator("#models")).to_be_hidden()
    # Loading fails: the server's error text is shown.
    page.click("#load-settings summary")
    page.fill('#load-fields [data-param="seed"] input', "99")
    page.dispatch_event('#load-fields [data-param="seed"] input', "change")
    fake_api.status = {"status": "loading", "pipeline_id": "glow"}
    with page.expect_request(posting("/api/v1/pipeline/load")) as load:
        page.click("#load")
    assert load.value.post_data_json == {
        "pipeline_id": "glow",
        "load_params": {"width": 256, "seed": 99},
    }
    expect(page.locator("#load")).to_have_text("Loading…")
    fake_api.status = {"status": "error", "pipeline_id": "glow", "error": "CUDA out of memory"}
    expect(page.locator("#load-status")).to_have_text("Failed to load: CUDA out of memory")
    expect(page.locator("#alert-text")).to_contain_text("CUDA out of memory")


def test_page_modules(offline_page: Page) -> None:
    """The reconnect delays, the parameter queue and the progress shapes, in the browser."""
    result = offline_page.evaluate(
        """async () => {
          const { Backoff } = await import("/static/js/stream.js");
          const { ParamQueue } = await import("/static/js/params.js");
          const { readProgress } = await import("/static/js/api.js");
          const backoff = new Backoff();
          const delays = Array.from({ length: 8 }, () => backoff.next());
          const sent = [];
          const queue = new ParamQueue((patch) => { sent.push({ ...patch }); return true; });
          queue.queue({ noise: 0.1 }, 40);
          queue.queue({ noise: 0.2 }, 40);
          queue.queue({ paused: true }, 40);
          await new Promise((resolve) => setTimeout(resolve, 300));
          return {
            delays,
            sent,
            fraction: readProgress(0.25).percent,
            percent: readProgress(42).percent,
            object: readProgress({ percentage: 50, current_file: "a.bin", state: "downloading" }),
            failed: readProgress({ state: "error", error: "403" }),
          };
        }"""
    )
    assert result["delays"] == [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
    assert result["sent"] == [{"noise": 0.2, "paused": True}]
    assert result["fraction"] == 25 and result["percent"] == 42
    assert result["object"] == {"percent": 50, "file": "a.bin", "state": "downloading", "error": ""}
    assert result["failed"]["error"] == "403"
