"""The causal Wan block loop split into stages (VAE encode and decode in processes of their own)
against the one-process pipeline and against Scope's outputs, on tiny random models in the real
on-disk layout: the same frames for the same session (prompt switch, cuts, Krea's re-encoded
context), a killed stage failing its sessions only, stages placed on two stand-in devices."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from services.inference import registry  # noqa: E402
from services.inference.pipeline import Request  # noqa: E402
from services.inference.wan import specs as ws  # noqa: E402
from services.inference.wan.split import SplitState, SplitWanPipeline, StageLost  # noqa: E402

pytestmark = [pytest.mark.timeout(240), pytest.mark.usefixtures("one_thread")]

SIZE = 32
SPECS = {s.id: s for s in (ws.STREAMDIFFUSIONV2, ws.LONGLIVE, ws.KREA_REALTIME_VIDEO)}
#: One torch thread in each stage process, as in this process: the same arithmetic.
SPLIT = {"threads": 1}
WAIT_S = 60.0


def config(pipeline_id: str, **params: Any) -> Any:
    return registry.full_config(SPECS[pipeline_id], {"height": SIZE, "width": SIZE, **params})


@pytest.fixture(scope="module")
def one_process(tiny_wan: Path) -> Iterator[dict[str, Any]]:
    pipes: dict[str, Any] = {pid: spec.load(config(pid), tiny_wan) for pid, spec in SPECS.items()}
    for pipe in pipes.values():
        pipe.prefetch = False  # block by block, on the call: the plainest reference
    yield pipes
    for pipe in pipes.values():
        pipe.close()


@pytest.fixture(scope="module")
def split(tiny_wan: Path) -> Iterator[dict[str, Any]]:
    pipes: dict[str, Any] = {}
    try:
        for pid, spec in SPECS.items():
            # streamdiffusionv2's stages on two stand-in devices (the CPU under two names).
            placement = {"encode": "cpu:0", "decode": "cpu:1"} if "diffusion" in pid else {}
            pipes[pid] = spec.load(config(pid, split={**SPLIT, **placement}), tiny_wan)
        yield pipes
    finally:
        for pipe in pipes.values():
            pipe.close()


def moving_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return [np.roll(base, 3 * i, axis=1) for i in range(n)]


def plain(pipe: Any, state: Any, requests: list[tuple[int, Any]]) -> list[Any]:
    """The one-process pipeline's frames (tag, frame) for these requests (frames None: a text
    tick), every frame it made included."""
    out: list[Any] = []
    for tag, frames in requests:
        prepared = None if frames is None else pipe.prepare(state, frames)
        results = pipe([Request(state.session_id, state, prepared, tag)]) + pipe.ready(state)
        out.extend((r.tag, r.frame) for r in results if r.frame is not None)
    return out


def staged(
    pipe: SplitWanPipeline, s: SplitState, requests: list[tuple[int, Any]], want: int
) -> list[Any]:
    """The split pipeline's frames for the same requests, at least ``want`` of them. Video
    frames are fed no faster than the transformer takes blocks (a camera slower than the
    model), so each block gets the inputs it gets in one process."""
    out: list[Any] = []

    def collect(results: list[Any]) -> None:
        out.extend((r.tag, r.frame) for r in results if r.frame is not None)

    for tag, frames in requests:
        while len(s.posted) >= 2 and not s.posted[0].done():
            s.posted[0].result(timeout=WAIT_S)
        prepared = None if frames is None else pipe.prepare(s, frames)
        collect(pipe([Request(s.session_id, s, prepared, tag)]) + pipe.ready(s))
    deadline = time.monotonic() + WAIT_S
    while len(out) < want:
        assert time.monotonic() < deadline, f"{len(out)} of {want} frames"
        if s.mode != "video":
            collect(pipe([Request(s.session_id, s, None, -1)]))
        else:
            pipe.settle(s)
        collect(pipe.ready(s))
        time.sleep(0.005)  # the decoder's frames arrive on a thread; the deadline bounds it
    return out


def assert_same(got: list[Any], want: list[Any], video: bool) -> None:
    assert len(want) >= len(got) > 0
    for (tag_a, a), (tag_b, b) in zip(got, want, strict=False):
        if video:
            assert tag_a == tag_b
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


def ticks(pipe: Any, state: Any, n: int) -> list[Any]:
    """The one-process pipeline's next ``n`` text frames."""
    out: list[Any] = []
    while len(out) < n:
        out += plain(pipe, state, [(-1, None)])
    assert len(out) == n  # a block's frames are never cut short: n is at a block's end
    return out


@pytest.mark.parametrize("pipeline_id", list(SPECS))
def test_text_mode_through_the_stages_gives_the_one_process_frames(
    one_process: dict[str, Any], split: dict[str, Any], pipeline_id: str
) -> None:
    """Five blocks and more, the prompt switched mid-stream (longlive recaches; Krea rebuilds
    its cache from a re-encoded output frame from its third block on)."""
    g = ws.GEOMETRY[pipeline_id]
    first, later = 4 * g.first_block_frames - 3, 4 * g.block_frames
    cfg = config(pipeline_id)
    dog = msgspec.structs.replace(cfg, prompts=[ws.PromptItem("a dog on the moon")])

    pipe = split[pipeline_id]
    b = pipe.new_session("b", SIZE, SIZE, cfg)
    got = staged(pipe, b, [], first + later)
    pipe.update(b, dog, {"prompts"})  # waits for the blocks under way: the switch is after them
    switched_after = b.blocks
    total = first + (switched_after + 1) * later
    got += staged(pipe, b, [], total - len(got))
    pipe.end_session(b)

    ref = one_process[pipeline_id]
    a = ref.new_session("a", SIZE, SIZE, cfg)
    want = ticks(ref, a, first + (switched_after - 1) * later)
    assert a.blocks == switched_after
    ref.update(a, dog, {"prompts"})
    want += ticks(ref, a, total - len(want))
    assert b.stream.recaches == a.stream.recaches  # (the split made blocks ahead of total)
    ref.end_session(a)
    assert len(got) >= total
    assert_same(got[:total], want, video=False)


@pytest.mark.parametrize("pipeline_id", list(SPECS))
def test_video_mode_through_the_stages_gives_the_one_process_frames(
    one_process: dict[str, Any], split: dict[str, Any], pipeline_id: str
) -> None:
    """Moving input, a prompt switch (a hard cut under manage_cache: both VAE ends start
    afresh in their processes) and a reset_cache cut; every frame keeps its input's tag."""
    g = ws.GEOMETRY[pipeline_id]
    first, later = 4 * g.first_block_frames - 3, 4 * g.block_frames
    cfg = config(pipeline_id)
    dog = msgspec.structs.replace(cfg, prompts=[ws.PromptItem("a dog on the moon")])
    reset = msgspec.structs.replace(dog, reset_cache=True)
    frames = moving_frames(3 * first + 4 * later)
    tagged = list(enumerate(frames))
    parts = (
        tagged[: first + 2 * later],
        tagged[first + 2 * later : 2 * first + 3 * later],
        tagged[2 * first + 3 * later :],
    )

    def run(pipe: Any, s: Any, feed: Any) -> list[Any]:
        out = feed(pipe, s, parts[0])
        pipe.update(s, dog, {"prompts"})
        out += feed(pipe, s, parts[1])
        pipe.update(s, reset, {"reset_cache"})
        return out + feed(pipe, s, parts[2])

    ref = one_process[pipeline_id]
    a = ref.new_session("a", SIZE, SIZE, cfg)
    want = run(ref, a, plain)
    made = (a.stream.cuts, a.blocks)
    ref.end_session(a)
    pipe = split[pipeline_id]
    b = pipe.new_session("b", SIZE, SIZE, cfg)
    got = run(pipe, b, lambda p, s, part: staged(p, s, part, 0))
    got += staged(pipe, b, [], len(want) - len(got))
    assert (b.stream.cuts, b.blocks) == made and made[0] == 3  # the start and both cuts
    pipe.end_session(b)
    assert len(got) == len(want)
    assert_same(got, want, video=True)


def test_stages_run_on_the_devices_their_placement_names(split: dict[str, Any]) -> None:
    pipe = split["streamdiffusionv2"]
    encode, decode = pipe.stages
    assert encode.device.startswith("cpu:0 (stand-in") and decode.device.startswith("cpu:1")
    assert len({os.getpid(), encode.pid, decode.pid}) == 3  # three processes
    assert all(stage.process.is_alive() for stage in pipe.stages)
    info = pipe.stage_ms()
    assert set(info) == {"encode", "transformer", "decode"}


def test_a_killed_stage_fails_its_sessions_and_the_next_session_gets_a_new_one(
    one_process: dict[str, Any], split: dict[str, Any]
) -> None:
    pipe = split["longlive"]
    cfg = config("longlive")
    s = pipe.new_session("doomed", SIZE, SIZE, cfg)
    staged(pipe, s, [], 9)  # streaming
    _, decode = pipe.stages
    os.kill(decode.pid, signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S
    with pytest.raises(StageLost, match=r"decode stage of longlive \(pid \d+\) died"):
        while time.monotonic() < deadline:
            pipe([Request("doomed", s, None, -1)])
            pipe.ready(s)
            time.sleep(0.01)  # the stage's death reaches the session on a thread
    pipe.end_session(s)  # what the inference service does with a failed session
    # The next session gets a new decode stage and the frames a fresh session gets.
    fresh = pipe.new_session("fresh", SIZE, SIZE, cfg)
    assert pipe.stages[1].pid != decode.pid and pipe.stages[1].lost is None
    got = staged(pipe, fresh, [], 9 + 12)
    pipe.end_session(fresh)
    ref = one_process["longlive"]
    a = ref.new_session("a", SIZE, SIZE, cfg)
    want = ticks(ref, a, 9 + 12)
    ref.end_session(a)
    assert_same(got[:21], want, video=False)
