"""``supervisor worker --connect URL``: a Dreams GPU worker that pushes frames to a hub.

It connects to the hub's ``WS /ws/gpu`` (``Authorization: Bearer $DREAM_GEN_AUTH_TOKEN``), then
runs a :class:`Generator` at the target fps, encodes each frame as WebP and sends, per frame,
a 0x04 status (``frame_number``, ``keyframe``, ``generation_time_ms``, ``target_fps``) followed by
the 0x01 frame; a 0x03 heartbeat every few seconds; a 0x02 state snapshot at every new keyframe
(a checkpoint a relaunched worker resumes from) and when asked. It obeys 0x10 pause, 0x11 resume,
0x12 save state, 0x13 shutdown (snapshot, then exit 0) and 0x14 load state. It starts generating
at the hub's first 0x11 (or ``INITIAL_COMMAND_WAIT_S`` after connecting, for a hub that sends
none). A lost connection is retried with backoff (1 s doubling to 30 s); a refused token exits 2.

The state (:class:`DreamState`: prompt, seed, frame and keyframe counters) is msgpack. The
built-in generator ``testcard`` draws the frame number (``services.testpattern``) on a moving
pattern. ``pipeline:<id>`` runs a text-mode inference pipeline of the registry (``dream``;
``testcard`` for tests) in this process (``dreams.pipeline``; ``--models-dir``,
``--load-params``). Other generators register themselves with :func:`register_generator`.
A generator that raises makes the worker report the error (0x04 ``error``) and exit 1.

Run ``supervisor worker --connect ws://127.0.0.1:8000/ws/gpu [--generator pipeline:dream]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from typing import Any

import aiohttp
import av
import msgspec
import numpy as np

from dreams.generators import (
    DEFAULT_WEBP_METHOD,
    Generator,
    GeneratorFactory,
    WorkerOptions,
    registered,
    registered_names,
)
from dreams.wire import AUTH_TOKEN_ENV, DEFAULT_PROMPT, DreamState, MsgType, control
from services.runtime import configure_logging, die_with_parent

__all__ = [
    "WorkerCore",
    "add_worker_parser",
    "encode_webp",
    "find_generator",
    "run_worker",
]

logger = logging.getLogger("dreams.worker")

INITIAL_COMMAND_WAIT_S = 2.0
RECONNECT_INITIAL_S = 1.0
RECONNECT_MAX_S = 30.0
MAX_HUB_MESSAGE_BYTES = 4 * 1024 * 1024
EXIT_REFUSED = 2
CLOSE_TIMEOUT_S = 2.0
#: A worker stalled this long or less (a busy machine) catches up, keeping its average rate
#: (the hub's playback queue absorbs the burst); further behind, it drops the debt.
MAX_CATCH_UP_S = 1.0
PIPELINE_PREFIX = "pipeline:"


def find_generator(name: str) -> GeneratorFactory:
    """The factory of ``--generator name``; ``ValueError`` naming the known ones."""
    factory = registered(name)
    if factory is not None:
        return factory
    if name.startswith(PIPELINE_PREFIX):  # imported only by pipeline workers
        from dreams.pipeline import pipeline_factory

        return pipeline_factory(name.removeprefix(PIPELINE_PREFIX))
    known = ", ".join([*registered_names(), f"{PIPELINE_PREFIX}<id>"])
    raise ValueError(f"unknown generator {name!r} (known: {known})")


def make_generator(options: WorkerOptions) -> Generator:
    return find_generator(options.generator)(options)


def encode_webp(rgb: np.ndarray, quality: int = 80, method: int = DEFAULT_WEBP_METHOD) -> bytes:
    """RGB uint8 → lossy WebP (PyAV's libwebp). ``method`` is libwebp's speed/size trade-off,
    0 (fast) to 6; ffmpeg's default 4 takes 130 ms at 1024x512 here, 2 about 40 ms for 8 %
    more bytes."""
    height, width = rgb.shape[:2]
    codec = av.CodecContext.create("libwebp", "w")
    codec.width = width
    codec.height = height
    codec.pix_fmt = "yuv420p"
    codec.options = {"quality": str(quality), "compression_level": str(method)}
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    packets = codec.encode(frame.reformat(format="yuv420p")) + codec.encode(None)
    return b"".join(bytes(p) for p in packets)


class WorkerCore:
    """The worker's logic, no sockets: state, counters, one frame at a time."""

    def __init__(self, options: WorkerOptions, generator: Generator) -> None:
        self.options = options
        self.generator = generator
        self.state = DreamState(
            prompt=options.prompt or DEFAULT_PROMPT,
            seed=options.seed if options.seed is not None else int.from_bytes(os.urandom(4)),
            generator=options.generator,
        )
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(DreamState)

    def snapshot(self) -> bytes:
        return self._encoder.encode(self.state)

    def load(self, data: bytes | memoryview) -> None:
        """Restore a snapshot; prompt/seed given on the command line win over saved ones."""
        state = self._decoder.decode(data)
        if self.options.prompt is not None:
            state.prompt = self.options.prompt
        if self.options.seed is not None:
            state.seed = self.options.seed
        state.generator = self.options.generator
        self.state = state
        logger.info(
            "state loaded: frame %d, keyframe %d, seed %d",
            state.frame_number,
            state.keyframe_number,
            state.seed,
        )

    def next_frame(self) -> tuple[bytes, int, int, float, bool]:
        """Render and encode the next frame (blocking; run it in a thread).

        Returns (webp, frame number, keyframe number, generation ms, new keyframe)."""
        started = time.perf_counter()
        state = self.state
        rendered = self.generator.render(state)
        keyframe = rendered.keyframe_number
        if keyframe is None:
            keyframe = (state.frame_number - 1) // self.options.keyframe_interval
        new_keyframe = keyframe != state.keyframe_number
        state.keyframe_number = keyframe
        webp = encode_webp(rendered.rgb, self.options.quality, self.options.webp_method)
        number = state.frame_number
        state.frame_number += 1
        gen_ms = rendered.generation_time_ms
        if gen_ms is None:
            gen_ms = (time.perf_counter() - started) * 1000.0
        return webp, number, keyframe, gen_ms, new_keyframe


class HubRefused(Exception):
    """The hub refused the connection (token)."""


class GeneratorFailed(Exception):
    """The generator raised: the worker exits (1) rather than retry it."""


class _HubLink:
    """One connection to the hub."""

    def __init__(self, core: WorkerCore, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.core = core
        self.ws = ws
        self.options = core.options
        self.running = asyncio.Event()  # set: generating; clear: paused or not yet told
        self.told = asyncio.Event()  # the hub has said resume or pause
        self.shutdown = False

    async def send(self, kind: MsgType, payload: bytes = b"") -> None:
        await self.ws.send_bytes(control(kind, payload))

    async def send_status(self, **fields: object) -> None:
        await self.send(MsgType.STATUS, msgspec.json.encode(fields))

    async def run(self) -> bool:
        """Serve until the connection ends; True when the hub said shutdown."""
        await self.send_status(
            state="connected",
            target_fps=self.options.fps,
            resolution=[self.core.generator.width, self.core.generator.height],
            keyframe=self.core.state.keyframe_number,
        )
        receive = asyncio.create_task(self._receive(), name="worker.receive")
        generate = asyncio.create_task(self._generate(), name="worker.generate")
        tasks = [
            receive,
            generate,
            asyncio.create_task(self._heartbeat(), name="worker.heartbeat"),
        ]
        try:
            await asyncio.wait({receive, generate}, return_when=asyncio.FIRST_COMPLETED)
            if generate.done() and not generate.cancelled():
                exc = generate.exception()
                if exc is not None and not isinstance(exc, ConnectionError):
                    # A generator that fails (a pipeline error) will fail again: say so, go.
                    logger.error("the generator failed", exc_info=exc)
                    with contextlib.suppress(ConnectionError):
                        await self.send_status(state="error", error=f"generator failed: {exc!r}")
                    await self.ws.close()
                    raise GeneratorFailed(repr(exc)) from exc
            await receive
        finally:
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception) and not isinstance(
                    result, ConnectionError | GeneratorFailed
                ):
                    logger.error("worker task failed: %r", result)
        return self.shutdown

    async def _receive(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.BINARY or not message.data:
                logger.warning("ignoring a %s message from the hub", message.type.name)
                continue
            kind, payload = message.data[0], memoryview(message.data)[1:]
            if kind == MsgType.PAUSE:
                logger.info("paused by the hub")
                self.running.clear()
                self.told.set()
                await self.send_status(state="paused")
            elif kind == MsgType.RESUME:
                logger.info("resumed by the hub")
                self.running.set()
                self.told.set()
            elif kind == MsgType.SAVE_STATE:
                await self.send(MsgType.STATE, self.core.snapshot())
            elif kind == MsgType.LOAD_STATE:
                try:
                    self.core.load(payload)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    logger.warning("ignoring a bad state from the hub: %s", exc)
            elif kind == MsgType.SHUTDOWN:
                logger.info("shutdown requested by the hub: saving state")
                self.running.clear()
                self.shutdown = True
                await self.send(MsgType.STATE, self.core.snapshot())
                await self.ws.close()
                return
            else:
                logger.warning("ignoring unknown message type 0x%02x from the hub", kind)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_s)
            await self.send(MsgType.HEARTBEAT)

    async def _generate(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(INITIAL_COMMAND_WAIT_S):
                await self.told.wait()
        if not self.told.is_set():
            self.running.set()  # a hub that never says resume: just go
        interval = 1.0 / self.options.fps
        due = time.monotonic()
        while True:
            if not self.running.is_set():
                await self.running.wait()
                due = time.monotonic()
            webp, number, keyframe, gen_ms, new_keyframe = await asyncio.to_thread(
                self.core.next_frame
            )
            await self.send_status(
                frame_number=number,
                keyframe=keyframe,
                generation_time_ms=round(gen_ms, 1),
                target_fps=self.options.fps,
            )
            await self.send(MsgType.FRAME, webp)
            if new_keyframe:  # a checkpoint: a relaunched worker resumes from here
                await self.send(MsgType.STATE, self.core.snapshot())
            due += interval
            now = time.monotonic()
            if due < now - MAX_CATCH_UP_S:  # far behind (a slow generator): do not burst
                due = now
            await asyncio.sleep(max(0.0, due - now))


async def run_worker(options: WorkerOptions, stop: asyncio.Event | None = None) -> int:
    """Connect, generate, reconnect with backoff; the exit status."""
    stop = stop or asyncio.Event()
    try:  # a pipeline loads for a while: in a thread, so a signal still stops us after
        generator = await asyncio.to_thread(make_generator, options)
    except Exception:
        logger.exception("cannot load the generator %s", options.generator)
        return 1
    try:
        return await _serve(options, WorkerCore(options, generator), stop)
    finally:
        generator.close()


async def _serve(options: WorkerOptions, core: WorkerCore, stop: asyncio.Event) -> int:
    headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
    backoff = RECONNECT_INITIAL_S
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            try:
                async with http.ws_connect(
                    options.connect,
                    headers=headers,
                    heartbeat=30.0,
                    max_msg_size=MAX_HUB_MESSAGE_BYTES,
                    compress=0,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
                ) as ws:
                    logger.info("connected to %s", options.connect)
                    backoff = RECONNECT_INITIAL_S
                    session = _HubLink(core, ws)
                    run = asyncio.create_task(session.run(), name="worker.session")
                    stopped = asyncio.create_task(stop.wait(), name="worker.stop")
                    await asyncio.wait({run, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    if not run.done():  # SIGTERM: leave a snapshot, hang up
                        with contextlib.suppress(ConnectionError):
                            await session.send(MsgType.STATE, core.snapshot())
                        await ws.close()
                    stopped.cancel()
                    try:
                        if await run:
                            return 0
                    except GeneratorFailed:
                        return 1
                    logger.warning("connection to the hub closed (%s)", ws.close_code)
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status in (401, 403):
                    logger.error("the hub refused this worker (%d): check the token", exc.status)
                    return EXIT_REFUSED
                logger.warning("cannot connect to %s: %s", options.connect, exc)
            except (aiohttp.ClientError, OSError) as exc:
                logger.warning("cannot connect to %s: %s", options.connect, exc)
            if options.once or stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await stop.wait()
            backoff = min(backoff * 2, RECONNECT_MAX_S)
    return 0 if stop.is_set() else 1


# --- command line -------------------------------------------------------------------------


def _configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--connect", required=True, help="the hub's URL, ws[s]://host/ws/gpu")
    parser.add_argument(
        "--token", help=f"bearer token (default: ${AUTH_TOKEN_ENV}; prefer the variable)"
    )
    parser.add_argument(
        "--generator",
        default="testcard",
        help="frame generator: testcard (default) or pipeline:<id>, a text-mode inference "
        "pipeline (dream, testcard)",
    )
    parser.add_argument(
        "--models-dir", help="pipeline:<id>: models directory (default: dreamwire's)"
    )
    parser.add_argument(
        "--load-params",
        type=_json_object,
        help="pipeline:<id>: load parameters as a JSON object, e.g. '{\"keyframe_interval\": 8}'",
    )
    parser.add_argument("--fps", type=float, default=5.0, help="target frame rate (default 5)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--quality", type=int, default=80, help="WebP quality (default 80)")
    parser.add_argument(
        "--webp-method",
        type=int,
        default=DEFAULT_WEBP_METHOD,
        choices=range(7),
        help=f"WebP speed/size, 0 fast to 6 small (default {DEFAULT_WEBP_METHOD})",
    )
    parser.add_argument("--keyframe-interval", type=int, default=20, help="frames per keyframe")
    parser.add_argument(
        "--texture", type=int, default=0, help="testcard noise 0-127 (10: ~50 KB frames)"
    )
    parser.add_argument("--prompt", help="prompt (default: the saved one)")
    parser.add_argument("--seed", type=int, help="seed (default: the saved one, else random)")
    parser.add_argument("--once", action="store_true", help="exit when the connection ends")
    parser.add_argument(
        "--die-with-parent",
        type=int,
        metavar="PID",
        help="exit when process PID (the launcher) dies; PID, not our parent at start-up, "
        "since the launcher may already be gone when we get here",
    )
    parser.add_argument("--log-level", default=os.environ.get("DREAMWIRE_LOG_LEVEL", "INFO"))
    parser.set_defaults(func=cmd_worker)
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_worker_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``worker`` to the ``supervisor`` command's subcommands."""
    parser = subparsers.add_parser(
        "worker", help="run a Dreams GPU worker that pushes frames to a hub"
    )
    return _configure_parser(parser)


def cmd_worker(args: argparse.Namespace) -> int:
    configure_logging("worker", args.log_level)
    if args.die_with_parent:
        die_with_parent(args.die_with_parent)
    options = WorkerOptions(
        connect=args.connect,
        token=args.token if args.token is not None else os.environ.get(AUTH_TOKEN_ENV, ""),
        generator=args.generator,
        fps=args.fps,
        width=args.width,
        height=args.height,
        quality=args.quality,
        webp_method=args.webp_method,
        keyframe_interval=args.keyframe_interval,
        texture=max(0, min(127, args.texture)),
        prompt=args.prompt,
        seed=args.seed,
        once=args.once,
        models_dir=args.models_dir,
        load_params=args.load_params,
    )
    if options.fps <= 0 or options.width < 16 or options.height < 24:
        print("worker: --fps must be > 0, the frame at least 16x24", file=sys.stderr)
        return 2
    try:
        find_generator(options.generator)
        if options.generator.startswith(PIPELINE_PREFIX):
            from dreams.pipeline import load_params_for

            pipeline_id = options.generator.removeprefix(PIPELINE_PREFIX)
            load_params_for(pipeline_id, options.load_params, options.width, options.height)
    except ValueError as exc:  # registry.ParameterError included
        print(f"worker: {exc}", file=sys.stderr)
        return 2

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await run_worker(options, stop)

    return asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = _configure_parser(
        argparse.ArgumentParser(prog="supervisor worker", description="Run a Dreams GPU worker.")
    )
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
