"""The Scope HTTP API (signalling/api) against an in-memory backend with real state."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from signalling.api import ApiConfig, add_api_routes, create_api_app
from signalling.api.cors import CorsConfig
from signalling.api.errors import (
    ConcurrencyLimitReached,
    InvalidSdp,
    NoPipelineLoaded,
    UnknownPipeline,
    UnknownSession,
)
from signalling.api.ice import (
    DEFAULT_STUN_URL,
    IceConfig,
    IceServerProvider,
    StaticTurn,
    TwilioConfig,
)
from signalling.api.routes import api_operations
from signalling.api.studio import studio_operations
from signalling.api.types import (
    HardwareInfoResponse,
    IceCandidate,
    ModelsStatusResponse,
    PipelineLoadItem,
    PipelineStatusResponse,
    WebRtcOfferRequest,
    WebRtcOfferResponse,
)

pytestmark = pytest.mark.timeout(30)

OFFER_SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
KNOWN_PIPELINES = ("passthrough", "streamdiffusion")


class InMemoryBackend:
    """Implements ApiBackend with real state: loads, sessions, candidates, downloads."""

    def __init__(self, session_limit: int = 2) -> None:
        self.session_limit = session_limit
        self.load_calls: list[list[PipelineLoadItem]] = []
        self.status = PipelineStatusResponse(status="not_loaded")
        self.sessions: dict[str, list[IceCandidate]] = {}
        self.offers: list[WebRtcOfferRequest] = []
        self.downloads: list[str] = []
        self.healthy = True

    async def load_pipelines(self, items: list[PipelineLoadItem]) -> None:
        for item in items:
            if item.pipeline_id not in KNOWN_PIPELINES:
                raise UnknownPipeline(item.pipeline_id)
        self.load_calls.append(items)
        self.status = PipelineStatusResponse(
            status="loading", pipeline_id=items[0].pipeline_id, load_params=items[0].load_params
        )

    def finish_loading(self) -> None:
        self.status = PipelineStatusResponse(
            status="loaded",
            pipeline_id=self.status.pipeline_id,
            load_params=self.status.load_params,
            loaded_lora_adapters=[],
        )

    async def pipeline_status(self) -> PipelineStatusResponse:
        return self.status

    async def pipeline_schemas(self) -> dict[str, dict[str, Any]]:
        return {
            pid: {"id": pid, "config_schema": {"type": "object", "properties": {}}}
            for pid in KNOWN_PIPELINES
        }

    async def create_session(self, offer: WebRtcOfferRequest) -> WebRtcOfferResponse:
        if self.status.status != "loaded":
            raise NoPipelineLoaded()
        if len(self.sessions) >= self.session_limit:
            raise ConcurrencyLimitReached(self.session_limit)
        if "m=" not in offer.sdp:
            raise InvalidSdp("offer has no media section")
        session_id = uuid.uuid4().hex
        self.sessions[session_id] = []
        self.offers.append(offer)
        return WebRtcOfferResponse(sdp=offer.sdp, type="answer", sessionId=session_id)

    async def add_ice_candidates(self, session_id: str, candidates: list[IceCandidate]) -> None:
        if session_id not in self.sessions:
            raise UnknownSession(session_id)
        self.sessions[session_id].extend(candidates)

    async def close_session(self, session_id: str) -> None:
        if self.sessions.pop(session_id, None) is None:
            raise UnknownSession(session_id)

    async def models_status(self, pipeline_id: str) -> ModelsStatusResponse:
        if pipeline_id not in KNOWN_PIPELINES:
            raise UnknownPipeline(pipeline_id)
        return ModelsStatusResponse(downloaded=pipeline_id in self.downloads)

    async def download_models(self, pipeline_id: str) -> None:
        if pipeline_id not in KNOWN_PIPELINES:
            raise UnknownPipeline(pipeline_id)
        self.downloads.append(pipeline_id)

    async def hardware_info(self) -> HardwareInfoResponse:
        return HardwareInfoResponse(vram_gb=None)

    async def health(self) -> tuple[bool, dict[str, Any]]:
        stage = {"alive": True, "last_frame_age_s": 0.1 if self.healthy else 30.0}
        return self.healthy, {"stages": {"inference/passthrough": stage}}


@pytest.fixture
def backend() -> InMemoryBackend:
    return InMemoryBackend()


@pytest.fixture
async def client(backend: InMemoryBackend) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_api_app(backend, ApiConfig(max_body_bytes=4096))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def _loaded_with_session(client: TestClient[Any, Any], backend: InMemoryBackend) -> str:
    backend.status = PipelineStatusResponse(status="loaded", pipeline_id="passthrough")
    resp = await client.post("/api/v1/webrtc/offer", json={"sdp": OFFER_SDP, "type": "offer"})
    assert resp.status == 200
    session_id = (await resp.json())["sessionId"]
    assert isinstance(session_id, str)
    return session_id


# --- pipelines -------------------------------------------------------------------------------


async def test_load_scope_shape_reaches_backend(client, backend) -> None:
    resp = await client.post(
        "/api/v1/pipeline/load",
        json={"pipeline_id": "streamdiffusion", "load_params": {"height": 512, "seed": 42}},
    )
    assert resp.status == 200
    assert (await resp.json()) == {"message": "Pipeline loading initiated successfully"}
    assert backend.load_calls == [
        [PipelineLoadItem(pipeline_id="streamdiffusion", load_params={"height": 512, "seed": 42})]
    ]


async def test_load_list_shape_reaches_backend(client, backend) -> None:
    body = {
        "pipelines": [
            {"pipeline_id": "streamdiffusion", "load_params": {"width": 256}},
            {"pipeline_id": "passthrough"},
        ]
    }
    resp = await client.post("/api/v1/pipeline/load", json=body)
    assert resp.status == 200
    assert backend.load_calls == [
        [
            PipelineLoadItem(pipeline_id="streamdiffusion", load_params={"width": 256}),
            PipelineLoadItem(pipeline_id="passthrough", load_params=None),
        ]
    ]


async def test_load_pipeline_ids_shape_and_unknown_fields_accepted(client, backend) -> None:
    # Newer Scope frontends send pipeline_ids and extra fields; Scope ignores the extras.
    body = {"pipeline_ids": ["passthrough"], "load_params": {"seed": 1}, "connection_id": "c1"}
    resp = await client.post("/api/v1/pipeline/load", json=body)
    assert resp.status == 200
    assert backend.load_calls == [
        [PipelineLoadItem(pipeline_id="passthrough", load_params={"seed": 1})]
    ]


async def test_load_then_status_shape(client, backend) -> None:
    resp = await client.get("/api/v1/pipeline/status")
    assert (await resp.json())["status"] == "not_loaded"

    await client.post(
        "/api/v1/pipeline/load", json={"pipeline_id": "passthrough", "load_params": {}}
    )
    assert (await (await client.get("/api/v1/pipeline/status")).json())["status"] == "loading"

    backend.finish_loading()
    resp = await client.get("/api/v1/pipeline/status")
    assert resp.status == 200
    assert await resp.json() == {
        "status": "loaded",
        "pipeline_id": "passthrough",
        "load_params": {},
        "loaded_lora_adapters": [],
        "error": None,
        # Scope 0.2's additions: its UI copies produces_* into the offer.
        "loading_stage": None,
        "produces_video": True,
        "produces_audio": False,
    }


async def test_status_error_carries_text(client, backend) -> None:
    backend.status = PipelineStatusResponse(
        status="error", pipeline_id="streamdiffusion", error="CUDA out of memory"
    )
    body = await (await client.get("/api/v1/pipeline/status")).json()
    assert body["status"] == "error"
    assert body["error"] == "CUDA out of memory"


JSON = {"Content-Type": "application/json"}


async def test_malformed_json_is_400_naming_the_problem(client, backend) -> None:
    resp = await client.post(
        "/api/v1/pipeline/load",
        data=b'{"pipeline_id": ',
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400
    body = await resp.json()
    assert body["error"] == "invalid_json"
    assert "truncated" in body["detail"]
    assert backend.load_calls == []


async def test_empty_body_is_400(client) -> None:
    resp = await client.post("/api/v1/pipeline/load", data=b"", headers=JSON)
    assert resp.status == 400
    assert "empty" in (await resp.json())["detail"]


async def test_wrong_type_is_400_naming_the_field(client, backend) -> None:
    resp = await client.post("/api/v1/pipeline/load", json={"pipeline_id": 5})
    assert resp.status == 400
    body = await resp.json()
    assert body == {
        "error": "invalid_request",
        "detail": "Expected `str | null`, got `int` - at `$.pipeline_id`",
    }

    resp = await client.post("/api/v1/pipeline/load", json={"pipelines": [{"pipeline_id": 7}]})
    assert resp.status == 400
    assert "`$.pipelines[0].pipeline_id`" in (await resp.json())["detail"]
    assert backend.load_calls == []


async def test_load_with_no_or_two_shapes_is_400(client, backend) -> None:
    resp = await client.post("/api/v1/pipeline/load", json={"load_params": {}})
    assert resp.status == 400
    assert "pipeline_id" in (await resp.json())["detail"]

    both = {"pipeline_id": "passthrough", "pipelines": [{"pipeline_id": "passthrough"}]}
    resp = await client.post("/api/v1/pipeline/load", json=both)
    assert resp.status == 400
    assert "exactly one" in (await resp.json())["detail"]

    resp = await client.post("/api/v1/pipeline/load", json={"pipelines": []})
    assert resp.status == 400
    assert backend.load_calls == []


async def test_unknown_pipeline_is_404(client) -> None:
    resp = await client.post("/api/v1/pipeline/load", json={"pipeline_id": "nope"})
    assert resp.status == 404
    assert await resp.json() == {"error": "unknown_pipeline", "detail": "Unknown pipeline 'nope'"}


async def test_oversized_body_is_413(client, backend) -> None:
    big = {"pipeline_id": "passthrough", "load_params": {"blob": "x" * 10_000}}
    resp = await client.post("/api/v1/pipeline/load", json=big)
    assert resp.status == 413
    body = await resp.json()
    assert body["error"] == "payload_too_large"
    assert "4096" in body["detail"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer
        yield b'{"pipeline_id": "passthrough", "load_params": {"blob": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}}'

    resp = await client.post("/api/v1/pipeline/load", data=chunks(), headers=JSON)
    assert resp.status == 413
    assert (await resp.json())["error"] == "payload_too_large"
    assert backend.load_calls == []


async def test_pipeline_schemas(client) -> None:
    resp = await client.get("/api/v1/pipelines/schemas")
    assert resp.status == 200
    assert set((await resp.json())["pipelines"]) == set(KNOWN_PIPELINES)


# --- WebRTC ----------------------------------------------------------------------------------


async def test_offer_before_load_is_clear_400(client, backend) -> None:
    resp = await client.post("/api/v1/webrtc/offer", json={"sdp": OFFER_SDP, "type": "offer"})
    assert resp.status == 400
    assert await resp.json() == {
        "error": "pipeline_not_loaded",
        "detail": "Pipeline not loaded. Please load pipeline first.",
    }
    assert backend.sessions == {}


async def test_offer_answer_with_initial_parameters(client, backend) -> None:
    backend.status = PipelineStatusResponse(status="loaded", pipeline_id="passthrough")
    params = {"prompts": [{"text": "A cat", "weight": 1.0}], "denoising_step_list": [700, 500]}
    resp = await client.post(
        "/api/v1/webrtc/offer",
        json={"sdp": OFFER_SDP, "type": "offer", "initialParameters": params},
    )
    assert resp.status == 200
    body = await resp.json()
    assert set(body) == {"sdp", "type", "sessionId"}
    assert body["type"] == "answer"
    assert body["sessionId"] in backend.sessions
    assert backend.offers[0].initialParameters == params


async def test_offer_with_bad_sdp_is_400(client, backend) -> None:
    backend.status = PipelineStatusResponse(status="loaded", pipeline_id="passthrough")
    resp = await client.post("/api/v1/webrtc/offer", json={"sdp": "v=0\r\n", "type": "offer"})
    assert resp.status == 400
    assert (await resp.json())["error"] == "invalid_sdp"

    resp = await client.post("/api/v1/webrtc/offer", json={"sdp": OFFER_SDP, "type": "answer"})
    assert resp.status == 400
    assert "$.type" in (await resp.json())["detail"]
    assert backend.sessions == {}


async def test_concurrency_limit_is_429_with_fastrtc_body(client, backend) -> None:
    for _ in range(backend.session_limit):
        await _loaded_with_session(client, backend)
    resp = await client.post("/api/v1/webrtc/offer", json={"sdp": OFFER_SDP, "type": "offer"})
    assert resp.status == 429
    assert await resp.json() == {
        "status": "failed",
        "meta": {"error": "concurrency_limit_reached", "limit": 2},
    }


async def test_trickle_ice_known_session_204_unknown_404(client, backend) -> None:
    session_id = await _loaded_with_session(client, backend)
    candidates = {
        "candidates": [
            {
                "candidate": "candidate:1 1 udp 2122260223 192.168.1.2 54321 typ host",
                "sdpMid": "0",
                "sdpMLineIndex": 0,
            },
            {  # RTCIceCandidate.toJSON() also gives usernameFragment; Scope ignores it
                "candidate": "candidate:2 1 udp 1 10.0.0.1 1 typ host",
                "sdpMid": None,
                "sdpMLineIndex": None,
                "usernameFragment": "abcd",
            },
        ]
    }
    resp = await client.patch(f"/api/v1/webrtc/offer/{session_id}", json=candidates)
    assert resp.status == 204
    assert [c.sdpMid for c in backend.sessions[session_id]] == ["0", None]

    resp = await client.patch("/api/v1/webrtc/offer/no-such-session", json=candidates)
    assert resp.status == 404
    assert await resp.json() == {
        "error": "unknown_session",
        "detail": "Session no-such-session not found",
    }


async def test_delete_session(client, backend) -> None:
    session_id = await _loaded_with_session(client, backend)
    resp = await client.delete(f"/api/v1/webrtc/offer/{session_id}")
    assert resp.status == 204
    assert backend.sessions == {}
    resp = await client.delete(f"/api/v1/webrtc/offer/{session_id}")
    assert resp.status == 404
    resp = await client.patch(f"/api/v1/webrtc/offer/{session_id}", json={"candidates": []})
    assert resp.status == 404


# --- models, hardware, health ----------------------------------------------------------------


async def test_models_status_and_download(client, backend) -> None:
    resp = await client.get("/api/v1/models/status")
    assert resp.status == 400
    assert "pipeline_id" in (await resp.json())["detail"]

    resp = await client.get("/api/v1/models/status", params={"pipeline_id": "passthrough"})
    assert await resp.json() == {"downloaded": False, "progress": None}

    resp = await client.post("/api/v1/models/download", json={"pipeline_id": "passthrough"})
    assert resp.status == 200
    assert backend.downloads == ["passthrough"]
    resp = await client.get("/api/v1/models/status", params={"pipeline_id": "passthrough"})
    assert (await resp.json())["downloaded"] is True

    resp = await client.get("/api/v1/models/status", params={"pipeline_id": "nope"})
    assert resp.status == 404


async def test_hardware_info(client) -> None:
    resp = await client.get("/api/v1/hardware/info")
    assert resp.status == 200
    body = await resp.json()
    assert {k: body[k] for k in ("vram_gb", "spout_available", "ndi_available")} == {
        "vram_gb": None,
        "spout_available": False,
        "ndi_available": False,
    }
    # Scope 0.2 reads each integration's `available` and shows its reason.
    for name in ("spout", "ndi", "syphon"):
        assert body[name]["available"] is False and "WebRTC" in body[name]["reason"]


async def test_health_200_then_503_when_stale(client, backend) -> None:
    resp = await client.get("/health")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "healthy"
    assert "inference/passthrough" in body["detail"]["stages"]

    backend.healthy = False
    resp = await client.get("/health")
    assert resp.status == 503
    assert (await resp.json())["status"] == "unhealthy"


async def test_unknown_api_route_is_json_404(client) -> None:
    resp = await client.get("/api/v1/nope")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"


async def test_backend_crash_is_json_500(client, backend, caplog) -> None:
    async def boom() -> HardwareInfoResponse:
        raise RuntimeError("nvml went away")

    backend.hardware_info = boom
    with caplog.at_level(logging.ERROR, logger="signalling.api.routes"):
        resp = await client.get("/api/v1/hardware/info")
    assert resp.status == 500
    assert await resp.json() == {
        "error": "internal_error",
        "detail": "RuntimeError: nvml went away",
    }
    assert "GET /api/v1/hardware/info failed" in caplog.text


# --- CORS ------------------------------------------------------------------------------------


async def test_cors_preflight_from_localhost_dev_server_allowed(client) -> None:
    resp = await client.options(
        "/api/v1/webrtc/offer/abc",
        headers={
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "PATCH" in resp.headers["Access-Control-Allow-Methods"]
    assert "DELETE" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == "content-type"

    resp = await client.get("/api/v1/pipeline/status", headers={"Origin": "http://127.0.0.1:3000"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
    resp = await client.delete(
        "/api/v1/webrtc/offer/x", headers={"Origin": "http://localhost:5173"}
    )
    assert resp.status == 404
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "http://localhost.evil.example:5173", "https://localhost:5173"],
)
async def test_cors_preflight_from_other_origin_refused(client, origin: str) -> None:
    resp = await client.options(
        "/api/v1/webrtc/offer",
        headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
    )
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.get("/api/v1/pipeline/status", headers={"Origin": origin})
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_configured_origin(backend) -> None:
    config = ApiConfig(cors=CorsConfig(allow_origins=["https://studio.example"]))
    async with TestClient(TestServer(create_api_app(backend, config))) as c:
        ok = await c.options(
            "/api/v1/webrtc/offer",
            headers={"Origin": "https://studio.example", "Access-Control-Request-Method": "POST"},
        )
        assert ok.status == 204
        refused = await c.options(
            "/api/v1/webrtc/offer",
            headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"},
        )
        assert refused.status == 403


# --- OpenAPI and docs ------------------------------------------------------------------------


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for value in node.values() for r in _refs(value)]
    if isinstance(node, list):
        return [r for value in node for r in _refs(value)]
    return []


async def test_openapi_lists_every_route_with_components(client) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    listed = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    expected = {(op.method, op.path) for op in [*api_operations(), *studio_operations()]}
    assert listed == expected
    assert ("PATCH", "/api/v1/webrtc/offer/{sessionId}") in listed

    components = doc["components"]["schemas"]
    for name in (
        "PipelineLoadRequest",
        "PipelineLoadItem",
        "PipelineStatusResponse",
        "WebRtcOfferRequest",
        "WebRtcOfferResponse",
        "IceCandidateRequest",
        "IceServersResponse",
        "ConcurrencyLimitResponse",
        "ErrorResponse",
    ):
        assert name in components
    for ref in _refs(doc):
        assert ref.removeprefix("#/components/schemas/") in components

    offer = doc["paths"]["/api/v1/webrtc/offer"]["post"]
    assert offer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/WebRtcOfferRequest"
    }
    assert set(offer["responses"]) >= {"200", "400", "413", "429"}
    assert set(components["WebRtcOfferResponse"]["required"]) == {"sdp", "type", "sessionId"}
    status = components["PipelineStatusResponse"]["properties"]["status"]
    assert set(status["enum"]) == {"not_loaded", "loading", "loaded", "error"}


async def test_docs_page_renders_self_contained(client) -> None:
    resp = await client.get("/docs")
    assert resp.status == 200
    assert resp.content_type == "text/html"
    page = await resp.text()
    for op in api_operations():
        assert op.path in page
    assert 'id="schema-WebRtcOfferRequest"' in page
    assert "<script" not in page
    assert "src=" not in page


# --- ICE servers -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTwilio:
    """Twilio's Tokens endpoint on 127.0.0.1: fresh credentials on every call."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[str] = []
        self.app = web.Application()
        self.app.router.add_post("/2010-04-01/Accounts/{sid}/Tokens.json", self.tokens)

    async def tokens(self, request: web.Request) -> web.Response:
        self.calls.append(request.headers.get("Authorization", ""))
        if self.fail:
            return web.json_response({"message": "Authenticate", "code": 20003}, status=401)
        n = len(self.calls)
        return web.json_response(
            {
                "account_sid": request.match_info["sid"],
                "ttl": "86400",
                "ice_servers": [
                    {
                        "url": "stun:global.stun.twilio.com:3478",
                        "urls": "stun:global.stun.twilio.com:3478",
                    },
                    {
                        "url": "turn:global.turn.twilio.com:3478?transport=udp",
                        "urls": "turn:global.turn.twilio.com:3478?transport=udp",
                        "username": f"user-{n}",
                        "credential": f"cred-{n}",
                    },
                ],
            }
        )


async def _ice(backend: InMemoryBackend, provider: IceServerProvider) -> TestClient[Any, Any]:
    app = web.Application()
    add_api_routes(app, backend, ApiConfig(), ice=provider)
    test_client: TestClient[Any, Any] = TestClient(TestServer(app))
    await test_client.start_server()
    return test_client


async def test_ice_servers_default_stun(client) -> None:
    resp = await client.get("/api/v1/webrtc/ice-servers")
    assert resp.status == 200
    assert await resp.json() == {"iceServers": [{"urls": [DEFAULT_STUN_URL]}]}


async def test_ice_servers_static_turn(backend) -> None:
    turn = StaticTurn(urls=["turn:turn.local:3478"], username="u", credential="p")
    provider = IceServerProvider(IceConfig(turn=turn))
    test_client = await _ice(backend, provider)
    try:
        body = await (await test_client.get("/api/v1/webrtc/ice-servers")).json()
    finally:
        await test_client.close()
    assert body == {
        "iceServers": [
            {"urls": [DEFAULT_STUN_URL]},
            {"urls": ["turn:turn.local:3478"], "username": "u", "credential": "p"},
        ]
    }


async def test_ice_servers_twilio_fresh_after_cache_expiry(backend) -> None:
    twilio = FakeTwilio()
    async with TestServer(twilio.app, host="127.0.0.1") as twilio_server:
        clock = FakeClock()
        config = IceConfig(
            twilio=TwilioConfig(
                account_sid="AC123", auth_token="secret", base_url=str(twilio_server.make_url("/"))
            ),
            cache_s=60.0,
        )
        test_client = await _ice(backend, IceServerProvider(config, clock=clock))
        try:
            first = (await (await test_client.get("/api/v1/webrtc/ice-servers")).json())[
                "iceServers"
            ]
            again = (await (await test_client.get("/api/v1/webrtc/ice-servers")).json())[
                "iceServers"
            ]
            clock.now += 61.0
            later = (await (await test_client.get("/api/v1/webrtc/ice-servers")).json())[
                "iceServers"
            ]
        finally:
            await test_client.close()

    assert first[0] == {"urls": [DEFAULT_STUN_URL]}
    assert first[1] == {"urls": "stun:global.stun.twilio.com:3478"}
    assert first[2] == {
        "urls": "turn:global.turn.twilio.com:3478?transport=udp",
        "username": "user-1",
        "credential": "cred-1",
    }
    assert again == first  # served from the cache within 60 s
    assert later[2]["username"] == "user-2"  # fresh credentials after expiry
    assert later[2]["credential"] == "cred-2"
    assert len(twilio.calls) == 2
    assert twilio.calls[0].startswith("Basic ")


async def test_ice_servers_twilio_failure_falls_back(backend, caplog) -> None:
    twilio = FakeTwilio(fail=True)
    turn = StaticTurn(urls=["turn:turn.local:3478"], username="u", credential="p")
    async with TestServer(twilio.app, host="127.0.0.1") as twilio_server:
        config = IceConfig(
            turn=turn,
            twilio=TwilioConfig(
                account_sid="AC123", auth_token="secret", base_url=str(twilio_server.make_url("/"))
            ),
        )
        test_client = await _ice(backend, IceServerProvider(config))
        try:
            with caplog.at_level(logging.WARNING, logger="signalling.api.ice"):
                resp = await test_client.get("/api/v1/webrtc/ice-servers")
                body = await resp.json()
                # a failure is not cached: the next request asks Twilio again
                await test_client.get("/api/v1/webrtc/ice-servers")
        finally:
            await test_client.close()

    assert resp.status == 200
    assert body == {
        "iceServers": [
            {"urls": [DEFAULT_STUN_URL]},
            {"urls": ["turn:turn.local:3478"], "username": "u", "credential": "p"},
        ]
    }
    assert "from Twilio failed (Twilio answered HTTP 401)" in caplog.text
    assert "secret" not in caplog.text
    assert len(twilio.calls) == 2


async def test_ice_servers_twilio_unreachable_falls_back(backend, caplog) -> None:
    # A port nothing listens on: connection refused, answered with STUN only.
    probe = TestServer(web.Application(), host="127.0.0.1")
    await probe.start_server()
    dead_url = str(probe.make_url("/"))
    await probe.close()
    config = IceConfig(twilio=TwilioConfig(account_sid="AC1", auth_token="t", base_url=dead_url))
    provider = IceServerProvider(config)
    try:
        with caplog.at_level(logging.WARNING, logger="signalling.api.ice"):
            servers = await provider.ice_servers()
    finally:
        await provider.close()
        await provider.close()  # idempotent
    assert [s.urls for s in servers] == [[DEFAULT_STUN_URL]]
    assert "Twilio" in caplog.text


# --- writes from pages of other origins ------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "data"),
    [
        ({"Content-Type": "text/plain"}, b'{"pipeline_id": "passthrough"}'),
        ({"Content-Type": "application/x-www-form-urlencoded"}, b"pipeline_id=passthrough"),
        ({}, b'{"pipeline_id": "passthrough"}'),  # aiohttp says application/octet-stream
    ],
)
async def test_a_write_that_is_not_json_is_refused(client, backend, headers, data) -> None:
    resp = await client.post("/api/v1/pipeline/load", data=data, headers=headers)
    assert resp.status == 415
    assert (await resp.json())["error"] == "unsupported_media_type"
    assert backend.load_calls == []


async def test_a_write_without_a_body_passes_whatever_its_type(client) -> None:
    """Scope's recording start/stop POST nothing; HTTP libraries label that variously."""
    for headers in ({}, {"Content-Type": "application/octet-stream"}):
        resp = await client.post("/api/v1/recordings/x/start", headers=headers)
        assert resp.status != 415, await resp.text()


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_a_write_from_another_origin_is_refused(client, backend, method: str) -> None:
    resp = await client.request(
        method,
        "/api/v1/pipeline/load",
        json={"pipeline_id": "passthrough"},
        headers={"Origin": "https://evil.example"},
    )
    assert resp.status == 403
    body = await resp.json()
    assert body["error"] == "cross_origin_write_refused" and "evil.example" in body["detail"]
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert backend.load_calls == []
    # Reads stay open (without CORS headers the browser keeps the answer from the page).
    read = await client.get("/api/v1/pipeline/status", headers={"Origin": "https://evil.example"})
    assert read.status == 200


async def test_a_write_from_an_allowed_origin_goes_through(client, backend) -> None:
    resp = await client.post(
        "/api/v1/pipeline/load",
        json={"pipeline_id": "passthrough"},
        headers={"Origin": "http://localhost:5173"},
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


# --- hostile bodies ----------------------------------------------------------------------------


@pytest.fixture
async def roomy_client(backend: InMemoryBackend) -> AsyncIterator[TestClient[Any, Any]]:
    app = create_api_app(backend, ApiConfig(max_body_bytes=1 << 20))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/api/v1/onboarding/status", '{"completed": ' + DEEP + "}"),
        ("POST", "/api/v1/workflow/resolve", '{"nodes": ' + DEEP + "}"),
        ("POST", "/api/v1/pipeline/load", '{"pipeline_id": "passthrough", "load_params": '
         + "{\"a\": " * 100 + "1" + "}" * 100 + "}"),
        ("POST", "/api/v1/webrtc/offer", '{"sdp": "v=0", "type": "offer", "x": ' + DEEP + "}"),
        ("POST", "/api/v1/osc/inventory", '{"a": ' + DEEP + "}"),
    ],
)  # fmt: skip
async def test_deeply_nested_bodies_are_a_clear_400(
    roomy_client: TestClient[Any, Any], method: str, path: str, body: str
) -> None:
    resp = await roomy_client.request(
        method, path, data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400, await resp.text()
    answer = await resp.json()
    # Refused by depth, or first by type where the route's body is typed: never a 500.
    assert (answer["error"], answer["detail"]) == (
        "invalid_json",
        "Request body is nested deeper than 32 levels",
    ) or (answer["error"] == "invalid_request" and "Expected" in answer["detail"]), answer


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"nodes": 5}, "$.nodes"),
        ({"pipelines": [{"pipeline_id": 5}]}, "$.pipelines[0].pipeline_id"),
        ({"nodes": [{"pipeline_id": "passthrough", "loras": 5}]}, "$.nodes[0].loras"),
        ({"nodes": [{"loras": [{"filename": ["x"]}]}]}, "$.nodes[0].loras[0].filename"),
    ],
)
async def test_a_workflow_of_the_wrong_shape_names_the_field(
    roomy_client: TestClient[Any, Any], body: dict[str, Any], field: str
) -> None:
    resp = await roomy_client.post("/api/v1/workflow/resolve", json=body)
    assert resp.status == 400, await resp.text()
    answer = await resp.json()
    assert answer["error"] == "invalid_request" and answer["detail"].endswith(f"at `{field}`")


async def test_cors_preflight_for_put_from_an_allowed_origin(client) -> None:
    resp = await client.options(
        "/api/v1/onboarding/status",
        headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "PUT"},
    )
    assert resp.status == 204
    assert "PUT" in resp.headers["Access-Control-Allow-Methods"].split(", ")
