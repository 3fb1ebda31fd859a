"""Clients dreamwire did not write, against ``supervisor start``.

* The requests and data-channel messages Scope's own web UI sends (0.1.0 and 0.2.4, captured
  from it and restated here), on a real aiortc peer connection: its offer bodies, its text-mode
  ``addTransceiver("video")``, its ``transition`` and per-node ``node_id`` messages, the routes
  it polls.
* The reference pages' JavaScript (``shared/reference/scope-server-api.md``), run in Chromium
  as written, with only the host and port changed.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from client import DreamwireClient, PatternTrack
from conftest import SupervisorRun, async_wait_until, wait_until
from playwright.sync_api import Browser, ConsoleMessage
from shared_dir import shared_dir
from test_scope_params import CAMERA_PREVIEW_GRAPH, CAMERA_PREVIEW_WORKFLOW, UI_0_1_VIDEO

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = shared_dir() / "reference"
ARTIFACTS = ROOT / "artifacts"
CONFIG = """
[api.ice]
stun_urls = []
"""
Start = Callable[..., SupervisorRun]

#: The text of Scope's UI's transition message (its prompt box with 4 transition steps).
UI_TRANSITION = {
    "transition": {
        "target_prompts": [{"text": "a red fox, oil painting", "weight": 100}],
        "num_steps": 4,
        "temporal_interpolation_method": "slerp",
    }
}


@pytest.fixture
def server(start_supervisor: Start, tmp_path: Path) -> SupervisorRun:
    (tmp_path / "models" / "loras").mkdir(parents=True)
    (tmp_path / "models" / "loras" / "ink.safetensors").write_bytes(b"\0" * 2048)
    return start_supervisor(f'models_dir = "{tmp_path / "models"}"\n{CONFIG}')


@pytest.fixture
async def client(server: SupervisorRun) -> AsyncIterator[DreamwireClient]:
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as c:
        yield c


def frames_done(server: SupervisorRun, name: str) -> int:
    return server.service(name).frames_done


async def until_pong(client: DreamwireClient, tag: str) -> list[dict[str, Any]]:
    """Every message the server sent before it answered this ping (the channel is ordered and
    the server handles messages in turn: all earlier messages have been dealt with)."""
    await client.send_parameters({"type": "ping", "data": tag})
    await client.wait_message("pong")
    before, client.messages[:] = list(client.messages), []
    return before


# ---------------------------------------------------------------- Scope's web UI, replayed


async def test_ui_0_1_camera_session_with_its_loads_and_offer(
    server: SupervisorRun, client: DreamwireClient
) -> None:
    load = {"pipeline_ids": ["passthrough"], "load_params": {"height": 320, "width": 576}}
    status, _ = await client.request("POST", "/api/v1/pipeline/load", load)
    assert status == 200
    await async_wait_until(
        lambda: server.status().pipelines and server.status().pipelines[0].status == "loaded",
        30,
        "passthrough to load",
    )
    client.pattern = PatternTrack(576, 320, 30)
    # 0.1 also repeats an edited resolution in the offer: set at load, so only reported.
    offer = {**UI_0_1_VIDEO, "height": 320, "width": 576}
    await client.connect(client.pattern, initial_parameters=offer)
    await client.wait_frames(15, timeout_s=30)
    assert (client.received.width, client.received.height) == (576, 320)
    # Scope 0.1 loads a second time, identically, once the stream is up: nothing restarts.
    pid = server.service("inference/passthrough").pid
    status, _ = await client.request("POST", "/api/v1/pipeline/load", load)
    assert status == 200
    await client.wait_frames(15)
    assert server.service("inference/passthrough").pid == pid
    numbers = client.received.numbers
    assert numbers == sorted(numbers) and len(numbers) >= 25
    # The prompt settings mean nothing to passthrough: reported once, by name; the session
    # keys (input_mode, pipeline_ids, recording) are not.
    warning = await client.wait_message("warning")
    for key in ("prompts", "denoising_step_list", "noise_scale", "noise_controller"):
        assert key in warning["data"]
    for key in ("input_mode", "pipeline_ids", "recording"):
        assert key not in warning["data"]
    # The resolution the offer repeats is the loaded one: not warned about; another one is.
    await client.send_parameters({"height": 512})
    load_time = await client.wait_message("warning")
    assert "ignored height: set when the pipeline loads" in load_time["data"]
    await client.send_parameters(
        {"prompts": [{"text": "x", "weight": 100}], "quantize_mode": "none", "lookahead_ms": 0}
    )
    assert not [m for m in await until_pong(client, "1") if m["type"] in ("warning", "error")]


async def test_ui_0_2_graph_session_and_node_messages(
    server: SupervisorRun, client: DreamwireClient
) -> None:
    load = {
        "pipelines": [
            {
                "node_id": "passthrough",
                "pipeline_id": "passthrough",
                "load_params": {"height": 320, "width": 576},
            }
        ]
    }
    await client.load_pipelines(load["pipelines"])
    offer = {
        "input_mode": "video",
        "pipeline_ids": ["passthrough"],
        "produces_video": True,
        "produces_audio": False,
        "noise_scale": 0.7,
        "noise_controller": True,
        "graph": CAMERA_PREVIEW_GRAPH,
        "recording": False,
    }
    client.pattern = PatternTrack(576, 320, 30)
    await client.connect(client.pattern, initial_parameters=offer)
    await client.wait_frames(10, timeout_s=30)
    # 0.2's start-time messages are Scope features dreamwire lacks: no error, no warning.
    await client.send_parameters({"quantize_mode": "none", "lookahead_ms": 0})
    await client.send_parameters({"beat_cache_reset_rate": "none"})
    said = await until_pong(client, "start")
    assert not [m for m in said if m["type"] == "error"], said
    # Pause through the graph node: the pipeline stops while the camera still flows in.
    await client.send_parameters({"node_id": "passthrough", "paused": True})
    await until_pong(client, "paused")
    snap: dict[str, int] = {}

    def paused_while_decode_runs() -> bool:
        inf, dec = frames_done(server, "inference/passthrough"), frames_done(server, "decode")
        if "inf" in snap and inf == snap["inf"]:
            return dec - snap["dec"] >= 15
        snap.update(inf=inf, dec=dec)
        return False

    await async_wait_until(paused_while_decode_runs, 15, "output to pause while input flows")
    await client.send_parameters({"node_id": "nope", "paused": False})
    error = await client.wait_message("error")
    assert error["data"].startswith("node_id: no node 'nope'") and "passthrough" in error["data"]
    await client.send_parameters({"node_id": "passthrough", "paused": False})
    await client.wait_frames(10)


def _background(rgb: np.ndarray | None) -> np.ndarray:
    assert rgb is not None, "no frame yet"
    h, w = rgb.shape[:2]
    return rgb[h - 8 :, w // 4 : 3 * w // 4].reshape(-1, 3).mean(axis=0)


async def test_text_mode_from_a_bare_transceiver_and_the_ui_transition(
    server: SupervisorRun, client: DreamwireClient
) -> None:
    await client.load_pipeline("testcard")
    # scope-receive-video.md's initialParameters, and Scope's addTransceiver("video"): sendrecv
    # with no track on a generating pipeline is text mode.
    initial = {
        "prompts": [{"text": "A beautiful landscape", "weight": 1.0}],
        "denoising_step_list": [1000, 750, 500, 250],
        "manage_cache": True,
    }
    await client.connect(None, initial_parameters=initial, trackless="sendrecv")
    await client.wait_frames(20, timeout_s=30)
    numbers = client.received.numbers
    assert len(numbers) >= 15 and numbers == sorted(numbers)
    warning = await client.wait_message("warning")
    assert "denoising_step_list" in warning["data"] and "manage_cache" in warning["data"]
    start = _background(client.received.last_rgb)
    # The colour a session shows for the transition's target, from a second client.
    async with DreamwireClient(client.base_url, ice_servers=[]) as other:
        await other.connect(
            None, initial_parameters={"prompts": UI_TRANSITION["transition"]["target_prompts"]}
        )
        await other.wait_frames(10, timeout_s=30)
        target = _background(other.received.last_rgb)
    assert np.abs(target - start).max() > 12, "pick prompts with different colours"
    await client.send_parameters(UI_TRANSITION)

    async def reached() -> bool:
        await client.wait_frames(1)
        return bool(np.abs(_background(client.received.last_rgb) - target).max() < 6)

    for _ in range(60):
        if await reached():
            break
    else:
        raise AssertionError("the transition never reached its target colour")
    # A pipeline with no per-frame results sends none.
    assert not [m for m in client.messages if m.get("type") == "fetch_output"]


async def test_routes_the_ui_polls_answer_in_scope_shapes(
    server: SupervisorRun, client: DreamwireClient, tmp_path: Path
) -> None:
    base = client.base_url
    async with aiohttp.ClientSession() as http:

        async def get(path: str) -> Any:
            async with http.get(base + path) as resp:
                assert resp.status == 200, (path, await resp.text())
                assert resp.content_type == "application/json", path
                return await resp.json()

        cloud = await get("/api/v1/cloud/status")
        assert cloud["connected"] is False and cloud["last_close_code"] is None
        assert "last_close_code" in cloud  # missing would toast "Cloud connection lost"
        assert (await get("/api/v1/onboarding/status"))["completed"] is False
        async with http.put(
            base + "/api/v1/onboarding/status", json={"inference_mode": "local"}
        ) as resp:
            assert resp.status == 200
        async with http.put(base + "/api/v1/onboarding/status", json={"completed": True}):
            pass
        stored = await get("/api/v1/onboarding/status")
        assert stored["completed"] is True and stored["inference_mode"] == "local"
        on_disk = json.loads((server.base / "home" / "onboarding.json").read_text())
        assert on_disk["completed"] is True
        # The real log, every process's lines, followed by offset.
        first = await get("/api/v1/logs/tail?lines=200&since_offset=0")
        assert any("[signalling]" in line and "listening on" in line for line in first["lines"])
        assert any("[supervisor]" in line for line in first["lines"])
        await client.load_pipeline("testcard")
        more = await get(f"/api/v1/logs/tail?lines=200&since_offset={first['offset']}")
        assert any("inference/testcard" in line for line in more["lines"])
        assert more["offset"] > first["offset"]
        plugins = await get("/api/v1/plugins")
        ours = next(p for p in plugins["plugins"] if p["name"] == "dreamwire")
        assert {"passthrough", "testcard"} <= {x["pipeline_id"] for x in ours["pipelines"]}
        assert plugins["total"] == len(plugins["plugins"]) and plugins["failed_plugins"] == []
        loras = (await get("/api/v1/loras"))["lora_files"]
        assert [(f["name"], f["size_mb"] > 0) for f in loras] == [("ink", True)]
        assert (await get("/api/v1/lora/list"))["lora_files"] == loras
        sources = (await get("/api/v1/input-sources"))["input_sources"]
        assert sources and not any(s["available"] for s in sources)
        nodes = {n["node_type_id"]: n for n in (await get("/api/v1/nodes/definitions"))["nodes"]}
        assert [p["name"] for p in nodes["passthrough"]["inputs"]] == ["video"]
        assert nodes["testcard"]["inputs"] == [
            {
                "name": "prompts",
                "port_type": "string",
                "required": True,
                "description": "",
                "default_value": None,
            }
        ]
        async with http.post(base + "/api/v1/workflow/resolve", json=CAMERA_PREVIEW_WORKFLOW) as r:
            plan = await r.json()
        assert plan == {
            "can_apply": True,
            "items": [
                {
                    "kind": "pipeline",
                    "name": "passthrough",
                    "status": "ok",
                    "detail": None,
                    "action": None,
                    "can_auto_resolve": False,
                }
            ],
            "warnings": [],
        }
        assert (await get("/api/v1/tempo/status")) == {
            "enabled": False,
            "source": None,
            "beats_per_bar": 4,
            "beat_state": None,
        }
        assert (await get("/api/v1/tempo/sources")) == {"sources": {}}
        assert (await get("/api/v1/dmx/status"))["enabled"] is False
        assert (await get("/api/v1/osc/status"))["enabled"] is False
        # 0.2's settings tabs.
        assert (await get("/api/v1/dmx/config"))["mappings"] == []
        for path in ("/api/v1/dmx/paths", "/api/v1/osc/paths"):
            assert (await get(path)) == {"active": {}, "available": {}, "active_pipeline_ids": []}
        async with http.post(base + "/api/v1/osc/inventory", json={"paths": []}) as r:
            assert r.status == 200 and await r.json() == {"count": 0}
        async with http.get(base + "/api/v1/osc/stream") as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            assert await asyncio.wait_for(r.content.readline(), 10) == b": keepalive\n"
        schemas = (await get("/api/v1/pipelines/schemas"))["pipelines"]
        assert schemas["passthrough"]["supports_prompts"] is False
        assert schemas["testcard"]["supports_prompts"] is True
        assert schemas["moondream"]["usage"] == ["postprocessor"]
        ui = schemas["testcard"]["config_schema"]["properties"]["paused"]["ui"]
        assert ui["is_load_param"] is False  # live while streaming
        health = await get("/health")
        assert {"version", "git_commit", "server_start_time"} <= set(health)


# ---------------------------------------------------------------- the reference pages' code


def reference_blocks(name: str) -> list[str]:
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"the reference documents are not beside this checkout ({path})")
    return re.findall(r"```javascript\n(.*?)```", path.read_text(), re.S)


def as_written(code: str, port: int) -> str:
    """The documents' code with only the host and port changed."""
    return code.replace("http://localhost:8000", f"http://127.0.0.1:{port}")


def run_reference(
    browser: Browser,
    server: SupervisorRun,
    pipeline_id: str,
    load_params: dict[str, Any],
    connect: str,
    name: str,
    stage: str,
) -> None:
    """Load with the page's own functions, then run its connection block verbatim; the video
    element must play frames of the pipeline's size that ``stage`` made, with no error in the
    console."""
    load_block, *_ = reference_blocks("scope-server-api.md")
    functions = load_block.split("// Example:")[0]
    port = server.port
    context = browser.new_context()
    page = context.new_page()
    console: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        console.append(f"{msg.type}: {msg.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda exc: console.append(f"pageerror: {exc}"))
    try:
        # A page of the server's origin: getUserMedia needs a secure (loopback) context.
        page.goto(f"http://127.0.0.1:{port}/health")
        script = (
            "async () => {\n"
            + as_written(functions, port)
            + f"\nawait loadPipeline({json.dumps(pipeline_id)}, {json.dumps(load_params)});"
            + "\nawait waitForPipelineLoaded(60000, 200);\n"
            + as_written(connect, port)
            + "\nwindow.__video = document.querySelector('video');\n}"
        )
        page.evaluate(script)
        page.wait_for_function(
            """([w, h]) => {
              const v = window.__video;
              return v && v.videoWidth === w && v.videoHeight === h && v.currentTime > 1.0;
            }""",
            arg=[load_params["width"], load_params["height"]],
            timeout=60_000,
        )
        wait_until(lambda: frames_done(server, stage) >= 20, 30, f"frames through {stage}")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"reference-{name}.png"))
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"reference-{name}.console.txt").write_text("\n".join(console))
        context.close()
    errors = [line for line in console if line.startswith(("error", "pageerror"))]
    assert not errors, console
    assert any("Pipeline loaded successfully" in line for line in console), console


def connection_block(kind: str) -> str:
    blocks = reference_blocks("scope-server-api.md")
    marker = "getUserMedia" if kind == "video" else 'pc.addTransceiver("video")'
    return next(b for b in blocks if marker in b and "createOffer" in b)


def test_reference_page_streams_passthrough(browser: Browser, server: SupervisorRun) -> None:
    size = {"height": 512, "width": 512, "seed": 42}
    run_reference(
        browser, server, "passthrough", size, connection_block("video"), "passthrough", "decode"
    )


def test_reference_page_receives_testcard(browser: Browser, server: SupervisorRun) -> None:
    size = {"height": 96, "width": 128, "seed": 42}
    run_reference(
        browser,
        server,
        "testcard",
        size,
        connection_block("text"),
        "testcard",
        "inference/testcard",
    )


def test_reference_page_streams_streamdiffusion(
    browser: Browser, start_supervisor: Start, tiny_models: Path
) -> None:
    server = start_supervisor(f'models_dir = "{tiny_models}"\n{CONFIG}')
    size = {"height": 128, "width": 128, "seed": 42}
    run_reference(
        browser,
        server,
        "streamdiffusion",
        size,
        connection_block("video"),
        "streamdiffusion",
        "inference/streamdiffusion",
    )


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server's name
        body = b"<!doctype html><p>another site</p>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_page_of_another_origin_cannot_drive_the_server(
    browser: Browser, server: SupervisorRun
) -> None:
    """The simple requests a browser sends across origins without asking (text/plain, forms,
    no-cors) reach the server and are refused there; nothing is loaded or started."""
    base = f"http://127.0.0.1:{server.port}"
    context = browser.new_context()
    page = context.new_page()
    # A page served from another loopback address: Chromium lets it reach 127.0.0.1 (it would
    # stop a public page itself), and dreamwire allows only localhost and 127.0.0.1 by default.
    evil_server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), _Page)
    threading.Thread(target=evil_server.serve_forever, name="evil-page", daemon=True).start()
    evil = f"http://127.0.0.2:{evil_server.server_address[1]}"
    try:
        page.goto(evil + "/")
        page.evaluate(
            """async (base) => {
              const body = JSON.stringify({pipeline_id: "testcard"});
              await fetch(base + "/api/v1/pipeline/load", {method: "POST", mode: "no-cors", body});
              await fetch(base + "/api/v1/pipeline/load", {
                method: "POST", mode: "no-cors", body,
                headers: {"Content-Type": "application/x-www-form-urlencoded"}});
              await fetch(base + "/api/v1/models/download", {
                method: "POST", mode: "no-cors", body: JSON.stringify({pipeline_id: "dream"})});
              const form = document.createElement("form");
              form.method = "POST";
              form.action = base + "/api/v1/pipeline/load";
              form.enctype = "text/plain";
              const field = document.createElement("input");
              field.name = '{"pipeline_id": "testcard", "x": "';
              field.value = '"}';
              form.appendChild(field);
              document.body.appendChild(form);
              form.submit();
            }""",
            base,
        )
        page.wait_for_url(f"{base}/api/v1/pipeline/load")
        assert "cross_origin_write_refused" in page.content()
    finally:
        context.close()
        evil_server.shutdown()
        evil_server.server_close()
    assert server.status().pipelines == []
    assert server.run_dir is not None
    log = (server.run_dir / "server.log").read_text()
    assert log.count(f"refused POST /api/v1/pipeline/load from origin {evil}") == 3
    assert "refused POST /api/v1/models/download" in log
    assert "inference/testcard" not in log
