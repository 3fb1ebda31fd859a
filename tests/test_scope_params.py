"""Scope's parameter policy, mode and chain from the offer, and the studio routes' logic, in one
process, on the exact bodies and SDP lines Scope's clients send (captured from its web UI 0.1.0
and 0.2.4 and from Chromium)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.inference.catalog import ParameterError, PipelineCatalog
from signalling.api.loras import list_loras
from signalling.api.studio import Workflow, resolve_workflow, tail_log
from signalling.intent import graph_chain, offer_modes, read_intent

pytestmark = pytest.mark.timeout(30)

#: Scope 0.1.0's offer for passthrough with the camera.
UI_0_1_VIDEO = {
    "input_mode": "video",
    "prompts": [{"text": "a red fox", "weight": 100}],
    "prompt_interpolation_method": "linear",
    "denoising_step_list": [700, 500],
    "pipeline_ids": ["passthrough"],
    "noise_scale": 0.7,
    "noise_controller": True,
    "recording": False,
}
#: Scope 0.2.4's "Camera Preview" starter graph.
CAMERA_PREVIEW_GRAPH = {
    "nodes": [
        {
            "id": "input",
            "type": "source",
            "source_mode": "camera",
            "source_name": None,
            "source_flip_vertical": False,
        },
        {"id": "passthrough", "type": "pipeline", "pipeline_id": "passthrough"},
        {"id": "output", "type": "sink"},
    ],
    "edges": [
        {
            "from": "input",
            "from_port": "video",
            "to_node": "passthrough",
            "to_port": "video",
            "kind": "stream",
        },
        {
            "from": "passthrough",
            "from_port": "video",
            "to_node": "output",
            "to_port": "video",
            "kind": "stream",
        },
    ],
}
CAMERA_PREVIEW_WORKFLOW = {
    "format": "scope-workflow",
    "format_version": "1.0",
    "metadata": {"name": "Camera Check", "scope_version": "0.1.9"},
    "pipelines": [
        {
            "pipeline_id": "passthrough",
            "pipeline_version": "1.0.0",
            "source": {"type": "builtin"},
            "loras": [],
            "params": {},
        }
    ],
    "graph": CAMERA_PREVIEW_GRAPH,
}

# Chromium's video m-sections (Chromium 156): pc.addTransceiver("video") and
# pc.addTrack(track, stream).
CHROME_TRACKLESS = """v=0\r
m=video 9 UDP/TLS/RTP/SAVPF 96\r
a=mid:0\r
a=sendrecv\r
a=msid:- 661f8e88-bbc9-40f0-a1bd-76a1e4e87e30\r
a=ssrc:1275631639 msid:- 661f8e88-bbc9-40f0-a1bd-76a1e4e87e30\r
m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r
"""
CHROME_CAMERA = CHROME_TRACKLESS.replace("msid:- ", "msid:9d2c1b7e-5e1f-4d0a-9b38-2f4d1e7a8c60 ")


@pytest.fixture(scope="module")
def catalog() -> PipelineCatalog:
    return PipelineCatalog()


def test_unknown_keys_are_set_aside_and_session_keys_left_to_the_session(
    catalog: PipelineCatalog,
) -> None:
    checked = catalog.sort(("passthrough",), UI_0_1_VIDEO)
    assert checked.valid == {}
    assert checked.errors == ()
    # Scope's prompt settings mean nothing to passthrough; its session keys are not "unknown".
    assert set(checked.unknown) == {
        "prompts",
        "prompt_interpolation_method",
        "denoising_step_list",
        "noise_scale",
        "noise_controller",
    }


def test_a_bad_value_names_its_key_and_the_rest_apply(catalog: PipelineCatalog) -> None:
    checked = catalog.sort(
        ("streamdiffusion",),
        {"noise_scale": 2.0, "prompts": [{"text": "a cat", "weight": 100}], "zoom": 3},
    )
    assert checked.valid == {"prompts": [{"text": "a cat", "weight": 100.0}]}
    assert len(checked.errors) == 1 and checked.errors[0].startswith("noise_scale: ")
    assert checked.unknown == ("zoom",)


def test_a_chain_gives_each_key_to_the_pipeline_that_has_it(catalog: PipelineCatalog) -> None:
    checked = catalog.sort(
        ("streamdiffusion", "moondream"), {"noise_scale": 0.5, "feature": "caption"}
    )
    assert checked.valid == {"noise_scale": 0.5, "feature": "caption"}
    assert checked.unknown == ()


def test_load_params_of_the_reference_page(catalog: PipelineCatalog) -> None:
    # scope-server-api.md loads with {height, width, seed: 42}: passthrough has no seed.
    checked = catalog.sort(("passthrough",), {"height": 512, "width": 512, "seed": 42}, load=True)
    assert checked.valid == {"height": 512, "width": 512}
    assert checked.unknown == ("seed",)
    bad = catalog.sort(("passthrough",), {"height": "tall"}, load=True)
    assert bad.errors and bad.errors[0].startswith("height: ")


def test_load_time_keys_in_an_offer_are_set_aside(catalog: PipelineCatalog) -> None:
    # Scope 0.1 copies the resolution fields into initialParameters.
    checked = catalog.sort(("longlive",), {"height": 128, "width": 224, "manage_cache": False})
    assert checked.valid == {"manage_cache": False}
    assert checked.load_time == ("height", "width") and checked.errors == ()


def test_camera_preview_graph_is_a_chain_with_node_ids() -> None:
    intent = read_intent({**UI_0_1_VIDEO, "graph": CAMERA_PREVIEW_GRAPH})
    assert intent.mode == "video"
    assert intent.pipeline_ids == ("passthrough",)
    assert intent.nodes == {"passthrough": "passthrough"}


def test_a_longer_graph_keeps_stream_order() -> None:
    graph: dict[str, Any] = {
        "nodes": [
            {"id": "input", "type": "source"},
            {"id": "md", "type": "pipeline", "pipeline_id": "moondream"},
            {"id": "sd", "type": "pipeline", "pipeline_id": "streamdiffusion"},
            {"id": "output", "type": "sink"},
            {"id": "rec", "type": "record"},
        ],
        "edges": [
            {"from": "sd", "to_node": "md", "kind": "stream"},
            {"from": "input", "to_node": "sd"},
            {"from": "md", "to_node": "output"},
            {"from": "md", "to_node": "rec"},
            {"from": "md", "to_node": "sd", "kind": "parameter"},
        ],
    }
    assert graph_chain(graph) == (
        ("streamdiffusion", "moondream"),
        {"sd": "streamdiffusion", "md": "moondream"},
    )


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        ({"nodes": "x"}, "graph: expected an object with a list of nodes"),
        (
            {"nodes": [{"id": "n", "type": "node", "node_type_id": "scheduler"}], "edges": []},
            "graph: dreamwire runs a linear chain source → pipelines → sink; it has no node type "
            "for n (node)",
        ),
        (
            {
                "nodes": [
                    {"id": "a", "type": "pipeline", "pipeline_id": "passthrough"},
                    {"id": "b", "type": "pipeline", "pipeline_id": "passthrough"},
                ],
                "edges": [],
            },
            "graph: dreamwire runs one linear chain of pipelines; this graph has 2 starting "
            "points (a, b)",
        ),
        (
            {"nodes": [{"id": "a", "type": "pipeline"}], "edges": []},
            "graph: pipeline node 'a' has no pipeline_id",
        ),
    ],
)
def test_graphs_dreamwire_cannot_run_are_named(graph: Any, message: str) -> None:
    with pytest.raises(ParameterError) as info:
        graph_chain(graph)
    assert str(info.value) == message


def test_input_mode_must_be_video_or_text() -> None:
    with pytest.raises(ParameterError, match=r"^input_mode: "):
        read_intent({"input_mode": "audio"})


@pytest.mark.parametrize(
    ("sdp", "modes", "asked", "mode"),
    [
        (CHROME_TRACKLESS, ("text",), None, "text"),  # Scope 0.1/0.2 text mode, the docs
        (CHROME_TRACKLESS, ("video", "text"), None, "text"),
        (CHROME_TRACKLESS.replace("a=sendrecv", "a=recvonly"), ("video", "text"), None, "text"),
        (CHROME_CAMERA, ("video", "text"), None, "video"),
        (CHROME_CAMERA, ("video",), None, "video"),
        (CHROME_CAMERA, ("text",), None, "text"),  # a camera offered to a generator
        (CHROME_CAMERA, ("video", "text"), "text", "text"),  # input_mode wins
        (CHROME_TRACKLESS, ("video",), None, "video"),  # refused later: no input to use
    ],
)
def test_mode_from_intent(sdp: str, modes: tuple[str, ...], asked: Any, mode: str) -> None:
    """The offer's modes, the first the pipeline supports taken (the supervisor's
    ``pick_mode``), else the first (then refused, naming the mode)."""
    offered = offer_modes(sdp, asked)
    assert next((m for m in offered if m in modes), offered[0]) == mode


def test_log_tail_follows_offsets_and_waits_for_whole_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    assert tail_log(log, 10, None).lines == []
    log.write_text("one\ntwo\nthr")
    first = tail_log(log, 10, None)
    assert first.lines == ["one", "two"] and first.offset == len("one\ntwo\n")
    with log.open("a") as f:
        f.write("ee\nfour\n")
    second = tail_log(log, 10, first.offset)
    assert second.lines == ["three", "four"]
    assert tail_log(log, 10, second.offset).lines == []
    assert tail_log(log, 1, None).lines == ["four"]
    log.write_text("new\n")  # a new run's log: shorter than the offset
    assert tail_log(log, 10, second.offset).lines == ["new"]


def test_workflow_resolution(tmp_path: Path, catalog: PipelineCatalog) -> None:
    schemas = catalog.schemas()
    none = list_loras(tmp_path)
    plan = resolve_workflow(msgspec.convert(CAMERA_PREVIEW_WORKFLOW, Workflow), schemas, none)
    assert plan.can_apply and plan.warnings == []
    assert [(i.kind, i.name, i.status) for i in plan.items] == [("pipeline", "passthrough", "ok")]
    (tmp_path / "loras" / "styles").mkdir(parents=True)
    (tmp_path / "loras" / "styles" / "ink.safetensors").write_bytes(b"\0" * 1024)
    found = list_loras(tmp_path)
    assert [(f.name, f.folder) for f in found.lora_files] == [("ink", "styles")]
    other = {
        "nodes": [
            {"node_type_id": "scheduler"},
            {"pipeline_id": "ltx-video", "loras": [{"filename": "ink.safetensors"}]},
        ]
    }
    plan = resolve_workflow(msgspec.convert(other, Workflow), schemas, found)
    assert not plan.can_apply
    assert [(i.kind, i.name, i.status) for i in plan.items] == [
        ("node", "scheduler", "missing"),
        ("pipeline", "ltx-video", "missing"),
        ("lora", "ink.safetensors", "ok"),
    ]
