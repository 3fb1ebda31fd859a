"""Each media service's options: typed, one default each, filled from the config tree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from services.encode.encoder import Encoder
from services.encode.service import EncodeStage, EncodeState
from services.inference import registry
from services.inference.wan import specs as ws
from services.options import START_BITRATE_BPS, EncodeOptions
from services.runtime import ServiceSpec
from services.stage import StageSession
from services.topology import Kind
from supervisor.config import load_config
from supervisor.plan import service_plan

pytestmark = pytest.mark.timeout(30)


class NullOutbox:
    def send(self, service: str, message: Any) -> bool:
        return True


def spec(options: dict[str, Any]) -> ServiceSpec:
    return ServiceSpec(
        name="encode",
        kind=Kind.ENCODE,
        run_dir="/nonexistent",
        run_id="r",
        supervisor_pid=0,
        options=options,
    )


def plan(config: Any) -> dict[str, Any]:
    """The supervisor's service plan for ``config`` (without starting a supervisor)."""
    return {svc.name: svc for svc in service_plan(config, Path("/models"))}


def test_the_config_trees_encode_section_reaches_the_encoder() -> None:
    config = load_config(
        None, encode={"start_bitrate_bps": 2_000_000, "max_bitrate_bps": 4_000_000}
    )
    encoder = session_encoder(EncodeStage(spec(plan(config)["encode"].options), NullOutbox()))
    assert encoder.bitrate_bps == 2_000_000 and encoder.max_bitrate_bps == 4_000_000
    # Without a section: the one default (the encoder's own default is the same value).
    plain = EncodeStage(spec(plan(load_config(None))["encode"].options), NullOutbox())
    assert session_encoder(plain).bitrate_bps == START_BITRATE_BPS
    assert EncodeOptions().start_bitrate_bps == START_BITRATE_BPS


def session_encoder(stage: EncodeStage) -> Encoder:
    """The encoder the stage makes for a new session."""
    session: StageSession[EncodeState] = StageSession("s", 64, 48, {}, None)
    return stage.new_state(session, None).encoder


def test_an_unknown_or_bad_option_names_the_key() -> None:
    with pytest.raises(msgspec.ValidationError, match="bitrate_bps"):
        EncodeStage(spec({"bitrate_bps": 1}), NullOutbox())
    with pytest.raises(msgspec.ValidationError, match="max_bitrate_bps"):
        load_config(None, encode={"max_bitrate_bps": "fast"})


def test_mode_defaults_give_scopes_step_list_per_mode() -> None:
    """Scope's ModeDefaults: streamdiffusionv2 text 1000, 750; longlive and Krea video 1000, 750."""
    sdv2 = registry.schema(ws.STREAMDIFFUSIONV2)["mode_defaults"]
    assert sdv2["text"]["denoising_steps"] == [1000, 750]
    assert sdv2["video"]["denoising_steps"] == [750, 250]
    for spec_ in (ws.LONGLIVE, ws.KREA_REALTIME_VIDEO):
        modes = registry.schema(spec_)["mode_defaults"]
        assert modes["text"]["denoising_steps"] == [1000, 750, 500, 250]
        assert modes["video"]["denoising_steps"] == [1000, 750]
        assert modes["video"]["noise_scale"] == 0.7 and modes["video"]["noise_controller"] is True


def test_the_shipped_container_configs_load() -> None:
    """deploy/'s configs are what the image starts with: a typo there would fail at start."""
    root = Path(__file__).resolve().parent.parent / "deploy"
    one, two = load_config(root / "dreamwire.toml"), load_config(root / "dreamwire-2gpu.toml")
    assert one.host == "0.0.0.0" and one.devices == ["cuda:0"]
    assert two.devices == ["cuda:0", "cuda:1"]
    services = plan(two)
    assert "inference/longlive@cuda:1" not in services  # no pipeline preloaded
    with_longlive = msgspec.structs.replace(two, pipelines=["longlive"])
    assert {"inference/longlive@cuda:0", "inference/longlive@cuda:1"} <= set(plan(with_longlive))
    assert plan(with_longlive)["inference/longlive@cuda:1"].options["device"] == "cuda:1"


def test_the_shipped_front_and_node_configs_load_and_plan_their_processes() -> None:
    """deploy/front.toml runs signalling and the nodes link, no media; deploy/node*.toml run the
    media and a link to the front, no HTTP server (as ``supervisor node`` starts them)."""
    root = Path(__file__).resolve().parent.parent / "deploy"
    front = load_config(root / "front.toml")
    assert front.nodes is not None and set(front.nodes.allowed) == {"gpu1", "gpu2"}
    assert set(plan(front)) == {"nodes", "signalling"}
    for name, path in (("gpu1", "node.toml"), ("gpu2", "node-gpu2.toml")):
        node = load_config(root / path)
        assert node.node is not None and node.node.name == name
        as_node = msgspec.structs.replace(node, signalling=False)
        services = plan(as_node)
        assert {"decode", "encode", "node-link", "inference/longlive@cuda:0"} <= set(services)
        assert "signalling" not in services
