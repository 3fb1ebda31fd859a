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
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import SupervisorRun, wait_until
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Route,
    ViewportSize,
    expect,
)
from playwright.sync_api import Error as PlaywrightError

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "artifacts"
STATIC = ROOT / "signalling" / "static"
CONFIG = """
[api.ice]
stun_urls = []
"""
#: Moondream's overlay with the stand-in model of tests/overlay_stand_in.py (no weights here).
MOONDREAM_CONFIG = 'overlay_model = "overlay_stand_in:StandInMoondream"\n' + CONFIG
LAPTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
WAIT_MS = 30_000
NUMBER = re.compile(r"^\d+(\.\d)?$")
MILLISECONDS = re.compile(r"^\d+ ms$")
LATENCY = re.compile(r"^\d+(\.\d)? ms$")

Start = Callable[..., SupervisorRun]


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
    try:
        with open_page(browser, f"http://127.0.0.1:{server.port}/", request) as page:
            yield page
    except PlaywrightError as exc:
        # The server's side of the story, for a page that could not be opened.
        raise AssertionError(f"{exc}\n--- supervisor log ---\n{server.log()[-6000:]}") from exc


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


def expect_latency_chart(page: Page, stages: tuple[str, ...] = ("decode", "encode")) -> None:
    """The latency card names ``stages`` (in pipeline order) with their mean milliseconds, draws
    a bar segment for each, highlights the slowest stage and shows end-to-end p50/p95 and drops."""
    chart = page.locator("#latency")
    for stage in stages:
        item = chart.locator(f'.latency-item[data-stage="{stage}"]')
        expect(item.locator(".latency-name")).to_have_text(stage)
        expect(item.locator(".latency-ms")).to_have_text(NUMBER)
        expect(chart.locator(f'.latency-seg[data-stage="{stage}"]')).to_be_visible()
    expect(chart.locator('[data-latency="p50"]')).to_have_text(LATENCY)
    expect(chart.locator('[data-latency="p95"]')).to_have_text(LATENCY)
    expect(chart.locator('[data-latency="drops"]')).to_have_text(re.compile(r"^\d+$"))
    rows = chart.locator(".latency-item").evaluate_all(
        """els => els.map(e => ({
          stage: e.dataset.stage,
          ms: parseFloat(e.querySelector(".latency-ms").textContent),
          slowest: e.classList.contains("slowest"),
        }))"""
    )
    order = [row["stage"] for row in rows]
    assert [stage for stage in order if stage in stages] == list(stages), order
    (slowest,) = [row for row in rows if row["slowest"]]
    assert slowest["ms"] == max(row["ms"] for row in rows), rows
    expect(chart.locator(f'.latency-seg.slowest[data-stage="{slowest["stage"]}"]')).to_have_count(1)


def metrics_polls(page: Page) -> list[str]:
    """The session of each ``GET /api/v1/metrics`` the page makes from now on, in order
    (``"stop"`` markers may be appended by the test)."""
    polls: list[str] = []

    def on_request(request: Request) -> None:
        url = urlsplit(request.url)
        if url.path == "/api/v1/metrics":
            polls.append(parse_qs(url.query)["session"][0])

    page.on("request", on_request)
    return polls


# ---------------------------------------------------------------- tests


def test_camera_stream_plays_and_server_counts_frames(page: Page, server: SupervisorRun) -> None:
    stream_passthrough(page)
    assert page.evaluate("document.querySelector('#output').videoHeight") == 512
    wait_until(lambda: server.service("encode").frames_done >= 30, 10, "encode's count")
    # The readout fills in: frames per second, size, round-trip time over the data channel.
    expect(page.locator("#readout-size")).to_have_text("512×512")
    expect(page.locator("#readout-fps")).to_have_text(NUMBER)
    expect(page.locator("#readout-rtt")).to_have_text(MILLISECONDS)
    # Where the milliseconds go: the latency card, polled from /api/v1/metrics.
    expect_latency_chart(page)
    expect(page.locator("#outputs")).to_be_hidden()  # passthrough sends no results
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
    polls = metrics_polls(page)
    stream_passthrough(page)
    expect_latency_chart(page)
    first = polls[-1]
    page.click("#start")  # now labelled Stop
    expect(page.locator("#stream-pill")).to_have_text("idle")
    expect(page.locator("#start .button-label")).to_have_text("Start")
    expect(page.locator("#latency")).to_be_hidden()
    polls.append("stop")
    wait_until(lambda: not server.status().sessions, 10, "the session to close on the server")
    done = server.service("encode").frames_done
    page.click("#start")
    wait_playing(page, width=512)
    wait_until(
        lambda: server.service("encode").frames_done >= done + 30, 10, "frames of the 2nd stream"
    )
    # The card follows the new session; the stopped one is no longer polled.
    expect_latency_chart(page)
    after = polls[polls.index("stop") + 1 :]
    assert after and first not in after, polls


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
    expect(page.locator("#latency")).to_be_hidden()
    wait_playing(page, width=512)
    done = server.service("encode").frames_done
    wait_until(
        lambda: server.service("encode").frames_done >= done + 15, 10, "frames after reconnect"
    )
    expect_latency_chart(page)


def test_moondream_results_show_as_data(
    browser: Browser, start_supervisor: Start, request: pytest.FixtureRequest
) -> None:
    """Moondream alone on the camera: its results (fetch_output on the data channel) show in the
    output card as data, the latency card includes the overlay stage."""
    server = start_supervisor(MOONDREAM_CONFIG)
    with open_page(browser, f"http://127.0.0.1:{server.port}/", request) as page:
        load(page, "moondream")
        page.click("#start")
        wait_playing(page, width=512)
        output = page.locator("#outputs")
        # Detect "person" (the defaults): the stand-in's two boxes, numbered as drawn.
        expect(output).to_have_attribute("data-feature", "detect")
        expect(output.locator(".card-title")).to_have_text("Output · detect")
        expect(output.locator(".output-frame")).to_have_text(re.compile(r"^frame \d+$"))
        expect(output.locator(".output-text")).to_have_text("2 boxes · person")
        expect(output.locator(".output-n")).to_have_text(["1", "2"])
        expect(output.locator(".output-label")).to_have_text(["person", "person"])
        expect(output.locator(".output-where").first).to_have_text("25%–75% × 25%–75%")
        expect_latency_chart(page, ("decode", "overlay", "encode"))
        ARTIFACTS.mkdir(exist_ok=True)
        page.set_viewport_size(PHONE)
        page.screenshot(path=str(ARTIFACTS / "web_page_moondream_390.png"), full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        page.set_viewport_size(LAPTOP)
        # Points on a cup, then a caption: the card shows the newest result of the new feature.
        page.fill('[data-param="detect_object"] input', "cup")
        page.select_option('[data-param="feature"] select', json.dumps("point"))
        expect(output.locator(".output-text")).to_have_text("2 points · cup")
        expect(output.locator(".output-where")).to_have_text(["50%, 50%", "20%, 80%"])
        page.select_option('[data-param="feature"] select', json.dumps("caption"))
        expect(output.locator(".output-text")).to_have_text(
            re.compile(r"^A normal caption of frame \d+\.$")
        )
        expect(output.locator(".output-items")).to_be_hidden()
        page.screenshot(path=str(ARTIFACTS / "web_page_moondream_1280.png"))
        page.click("#start")  # Stop
        expect(output).to_be_hidden()
        expect(page.locator("#latency")).to_be_hidden()


# ---------------------------------------------------------------- the page alone, scripted API

GLOW = {
    "id": "glow",
    "name": "Glow",
    "description": "A pipeline no page code knows about.",
    "supported_modes": ["video", "text"],
    "default_width": 256,
    "default_height": 256,
    "requires_models": True,
    "load_params": ["width", "seed", "quantization"],
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
            # An optional load setting that is off by default (Krea's fp8 weights).
            "quantization": {
                "anyOf": [{"enum": ["fp8_e4m3fn"]}, {"type": "null"}],
                "default": None,
                "ui": {"order": 10, "category": "configuration", "is_load_param": True},
            },
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
    quantization = page.locator('#load-fields [data-param="quantization"] select')
    expect(quantization.locator("option")).to_have_text(["None", "fp8_e4m3fn"])
    expect(quantization).to_have_value("null")
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
        "load_params": {"width": 256, "seed": 99, "quantization": None},
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


METRICS_SESSION = {
    "session_id": "s1",
    "end_to_end": {"count": 30, "mean_ms": 20.0, "p50_ms": 18.0, "p95_ms": 31.25},
    "stages": [
        {"stage": "decode", "process": "decode", "kind": "work", "share": 0.15,
         "latency": {"mean_ms": 3.0, "p50_ms": 2.9, "p95_ms": 4.0}},
        {"stage": "to_inference", "process": "inference/passthrough", "kind": "queue",
         "share": 0.05, "latency": {"mean_ms": 1.0, "p50_ms": 0.8, "p95_ms": 2.0}},
        {"stage": "encode", "process": "encode", "kind": "work", "share": 0.8,
         "latency": {"mean_ms": 16.0, "p50_ms": 15.0, "p95_ms": 25.0}},
    ],
    "drops": {"to_inference": 2, "encode": 1},
}  # fmt: skip


def test_latency_chart_and_output_modules(offline_page: Page) -> None:
    """The latency card from a scripted metrics source (a 404 ends polling quietly) and the
    output card's reading of each Moondream result shape, in the browser."""
    result = offline_page.evaluate(
        """async (session) => {
          const { ApiError } = await import("/static/js/api.js");
          const { LatencyChart, chartModel } = await import("/static/js/latency.js");
          const { describeOutput } = await import("/static/js/outputs.js");
          const root = document.querySelector("#latency").cloneNode(true);
          root.id = "latency-test";
          document.body.append(root);
          let calls = 0;
          const fetchMetrics = async (id) => {
            calls += 1;
            if (calls > 2) throw new ApiError(404, `Session ${id} not found`, null);
            return { sessions: [session] };
          };
          const chart = new LatencyChart(root, { fetchMetrics, intervalMs: 10 });
          chart.start("s1");
          const deadline = performance.now() + 5000;
          while (chart.polling && performance.now() < deadline) {
            await new Promise((resolve) => setTimeout(resolve, 10));
          }
          await new Promise((resolve) => setTimeout(resolve, 100)); // no poll after the 404
          const text = (sel) => Array.from(root.querySelectorAll(sel), (e) => e.textContent);
          const shown = {
            calls,
            state: root.dataset.state,
            hidden: root.hidden,
            note: root.querySelector(".latency-note").textContent,
            names: text(".latency-name"),
            values: text(".latency-ms"),
            slowest: text(".latency-item.slowest .latency-name"),
            summary: text(".latency-summary dd"),
            badges: text(".latency-drops:not([hidden])"),
            grow: Array.from(root.querySelectorAll(".latency-seg"), (e) => e.style.flexGrow),
          };
          chart.stop();
          shown.hiddenAfterStop = root.hidden;
          const waiting = chartModel({ ...session, end_to_end: { count: 0 }, stages: [] });
          return {
            shown,
            waiting: waiting.ready,
            caption: describeOutput({ feature: "caption", frame: 3,
                                      result: { caption: "A cat.", length: "short" } }),
            query: describeOutput({ feature: "query", frame: 4,
                                    result: { question: "Who?", answer: "Nobody." } }),
            detect: describeOutput({ feature: "detect", frame: 5, result: { object: "face",
              objects: [{ x_min: 0.25, y_min: 0.1, x_max: 0.75, y_max: 0.5 }] } }),
            point: describeOutput({ feature: "point", frame: 6,
                                    result: { object: "cup", points: [] } }),
            other: describeOutput({ frame_number: 7, text: "hello" }),
          };
        }""",
        METRICS_SESSION,
    )
    shown = result["shown"]
    assert shown["calls"] == 3 and shown["state"] == "ended", shown
    assert shown["note"] == "The session has ended." and not shown["hidden"]
    assert shown["hiddenAfterStop"]
    assert shown["names"] == ["decode", "to_inference", "encode"]
    assert shown["values"] == ["3.0", "1.0", "16.0"]
    assert shown["slowest"] == ["encode"]
    assert shown["summary"] == ["18.0 ms", "31.3 ms", "3"]
    assert shown["badges"] == ["↓2", "↓1"]
    assert shown["grow"] == ["0.15", "0.05", "0.8"]
    assert result["waiting"] is False
    assert result["caption"] == {
        "feature": "caption", "frame": 3, "question": "", "text": "A cat.", "items": []
    }  # fmt: skip
    assert (result["query"]["question"], result["query"]["text"]) == ("Who?", "Nobody.")
    assert result["detect"]["text"] == "1 box · face"
    assert result["detect"]["items"] == [{"n": 1, "label": "face", "where": "25%–75% × 10%–50%"}]
    assert result["point"]["text"] == "0 points · cup"
    assert (result["other"]["frame"], result["other"]["text"]) == (7, "hello")
