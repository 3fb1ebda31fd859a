"""A session's chain from the loaded pipelines: which processes, in which order, and errors."""

from __future__ import annotations

import pytest

from services import topology
from services.inference import registry
from services.topology import ChainError, Room, StageAddress, plan_chain

pytestmark = pytest.mark.timeout(30)


def chain_of(loaded: list[str], asked: list[str] | None = None) -> topology.Chain:
    """The chain with the registry's overlays (Moondream)."""
    return plan_chain(loaded, asked, overlays=registry.overlays())


def test_one_model_then_the_overlay_whatever_the_order_loaded() -> None:
    chain = chain_of(["moondream", "streamdiffusion", "passthrough"])
    assert chain.pipeline_ids == ("streamdiffusion", "moondream")
    assert chain.processing == ("inference/streamdiffusion", "overlay")
    assert chain.stages("video") == ["decode", "inference/streamdiffusion", "overlay", "encode"]
    assert chain.stages("text") == ["inference/streamdiffusion", "overlay", "encode"]


def test_the_client_picks_among_the_loaded() -> None:
    loaded = ["streamdiffusion", "passthrough", "moondream"]
    assert chain_of(loaded, ["passthrough"]).processing == ("inference/passthrough",)
    overlay_alone = chain_of(loaded, ["moondream"])
    assert overlay_alone.stages("video") == ["decode", "overlay", "encode"]
    both = chain_of(loaded, ["moondream", "passthrough"])  # asked in any order
    assert both.pipeline_ids == ("passthrough", "moondream")


def test_chains_that_cannot_be_made_name_pipeline_ids() -> None:
    with pytest.raises(ChainError, match=r"^pipeline_ids: krea not loaded \(loaded: testcard\)$"):
        chain_of(["testcard"], ["krea"])
    with pytest.raises(ChainError, match="one model pipeline and at most one overlay"):
        chain_of(["testcard", "passthrough"], ["testcard", "passthrough"])
    with pytest.raises(ChainError, match="no pipeline is loaded"):
        chain_of([])


def test_service_names_and_kinds() -> None:
    overlays = registry.overlays()
    assert overlays == {"moondream"}
    assert topology.service_of_pipeline("longlive", overlays) == "inference/longlive"
    assert topology.service_of_pipeline("moondream", overlays) == "overlay"
    assert topology.StageAddress.parse("inference/longlive").kind == "inference"
    assert topology.StageAddress.parse("encode").kind == "encode"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("decode", StageAddress("decode")),
        ("inference/longlive", StageAddress("inference", "longlive")),
        ("inference/longlive@cuda:1", StageAddress("inference", "longlive", "cuda:1")),
        ("node/gpu-a/encode", StageAddress("encode", node="gpu-a")),
        (
            "node/gpu-a/inference/krea-realtime-video@cuda:0",
            StageAddress("inference", "krea-realtime-video", "cuda:0", "gpu-a"),
        ),
        ("dreams-worker/lobby", StageAddress("dreams-worker", "lobby")),
    ],
)
def test_stage_addresses_parse_and_print_back(text: str, address: StageAddress) -> None:
    assert StageAddress.parse(text) == address
    assert str(address) == text
    assert address.local == text.split("/", 2)[2] if address.node else address.local == text


def test_a_session_goes_to_the_device_with_the_most_room() -> None:
    a, b = (
        topology.inference_service("longlive", "cuda:0"),
        topology.inference_service("longlive", "cuda:1"),
    )
    assert a == "inference/longlive@cuda:0"
    assert topology.StageAddress.parse(a).process == "inference/longlive"
    assert topology.StageAddress.parse(a).device == "cuda:0"
    assert topology.StageAddress.parse("encode").device is None
    gib = 2**30
    # Free memory first, whatever the session counts.
    assert topology.place([Room(a, 10 * gib, 0), Room(b, 30 * gib, 3)]) == b
    # Equal memory (or none reported: CPU stand-ins): the fewer sessions, then the name.
    assert topology.place([Room(a, 20 * gib, 2), Room(b, 20 * gib, 1)]) == b
    assert topology.place([Room(b, None, 1), Room(a, None, 1)]) == a
    with pytest.raises(ChainError, match="no device of the pipeline is ready"):
        topology.place([])
