"""The VAE stages of a split block loop: a process each, with one session's VAE end apiece.

A split causal Wan pipeline (``split`` load parameter, :mod:`.split`) keeps the transformer in
the inference process and runs its two VAE ends in stage processes of their own: **encode**
(video mode's input frames to latents, a :class:`~.ends.BlockInput` per session) and
**decode** (latents to frames, a :class:`~.ends.BlockOutput` per session, which for Krea also
re-encodes the older output frame its next block's cache is rebuilt from). Jobs and answers
travel over lossless shared-memory queues (:mod:`shm.queue`), in order, so block k+1 denoises
while block k decodes and block k+2 encodes.

:class:`VaeStage` is the inference process's side of one stage: it spawns the process, sends
jobs (each answered through a :class:`~concurrent.futures.Future`), and notices the process's
death, which fails every job in flight and every later one (:class:`StageLost`); the pipeline
then starts a new stage for new sessions. A stage process exits when its parent does.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import numpy as np

from shm.queue import BlockQueue, QueueClosed, QueueHandle, pack, unpack

logger = logging.getLogger(__name__)

Role = Literal["encode", "decode"]
Layout = list[tuple[str, list[int]]]
#: Jobs a stage holds at once (its inbox); the transformer waits when it is full.
QUEUE_SLOTS = 4
STAGE_START_TIMEOUT_S = 300.0


class StageLost(RuntimeError):
    """A VAE stage process died (or never came up): its sessions cannot go on."""


# ---------------------------------------------------------------- the messages


class Encode(msgspec.Struct, tag="encode"):
    """A block's input frames (``[T, H, W, 3]`` uint8) to latents."""

    session: str
    block: int
    cut: bool  # the stream starts afresh with this block
    latent_hw: tuple[int, int]
    noise_scale: float
    controller: bool
    block_frames: int
    layout: Layout


class Decode(msgspec.Struct, tag="decode"):
    """A block's latents (``[1, C, F, h, w]`` float32) to frames; ``reencode``: also the
    latent of the oldest kept output frame (Krea's next context)."""

    session: str
    block: int
    cut: bool
    height: int
    width: int
    keep: int
    reencode: bool
    layout: Layout


class End(msgspec.Struct, tag="end"):
    session: str


class Stop(msgspec.Struct, tag="stop"):
    pass


class Hello(msgspec.Struct, tag="hello"):
    device: str
    pid: int


class Done(msgspec.Struct, tag="done"):
    """A job's answer: its arrays (latents and the noise scale; frames and a context latent)."""

    session: str
    block: int
    ms: float
    noise_level: float | None
    layout: Layout


class Failed(msgspec.Struct, tag="failed"):
    session: str
    block: int
    error: str


Inbound = Encode | Decode | End | Stop
Outbound = Hello | Done | Failed
_inbound = msgspec.msgpack.Decoder(Inbound)
_outbound = msgspec.msgpack.Decoder(Outbound)
_encoder = msgspec.msgpack.Encoder()


class StageConfig(msgspec.Struct, frozen=True):
    role: Role
    pipeline_id: str
    vae_type: str
    models_dir: str
    #: ``same`` (the inference process's device), ``cpu``, ``cuda:N``; ``cpu:N`` is a stand-in
    #: device (the CPU, named as given: tests place stages on "two devices" with it).
    device: str = "same"
    threads: int | None = None


# ---------------------------------------------------------------- the stage process


def run_stage(config: StageConfig, inbox: QueueHandle, outbox: QueueHandle) -> None:
    """A stage process's life: load the VAE, answer jobs in order until told to stop or the
    parent is gone."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {config.role}-stage %(levelname)s %(message)s"
    )
    if config.device == "cpu" or config.device.startswith("cpu:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before CUDA starts: this process has none
    elif config.device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = config.device.removeprefix("cuda:")
    parent = os.getppid()
    jobs, answers = BlockQueue.attach(inbox), BlockQueue.attach(outbox)
    try:
        _serve(config, jobs, answers, lambda: os.getppid() == parent)
    except QueueClosed:
        logger.info("parent gone: exiting")
    finally:
        jobs.close()
        answers.close()


def _serve(config: StageConfig, jobs: BlockQueue, answers: BlockQueue, alive: Any) -> None:
    import torch

    from services.inference import diffusion as d
    from services.inference.wan.ends import BlockInput, BlockOutput
    from services.inference.wan.vae import open_vae

    if config.threads:
        torch.set_num_threads(config.threads)
    device = d.select_device("bfloat16")
    fresh = open_vae(config.vae_type, Path(config.models_dir), device.dtype, device.device)
    where = device.description
    if config.device.startswith("cpu:"):
        where = f"{config.device} (stand-in: {where})"
    logger.info("%s %s VAE on %s, pid %d", config.pipeline_id, config.vae_type, where, os.getpid())
    answers.put(_encoder.encode(Hello(where, os.getpid())), alive=alive)
    ends: dict[str, Any] = {}

    def answer(done: Done, arrays: list[np.ndarray]) -> None:
        done.layout = pack(arrays)
        answers.put(_encoder.encode(done), arrays, alive=alive)

    while True:
        message = jobs.get(alive=alive)
        assert message is not None  # no timeout: a message or QueueClosed
        job = _inbound.decode(message.header)
        if isinstance(job, Stop):
            return
        if isinstance(job, End):
            ends.pop(job.session, None)
            continue
        started = time.perf_counter()
        try:
            (array,) = unpack(message.payload, job.layout)
            x = torch.from_numpy(array).to(device.device)
            if isinstance(job, Encode):
                end = ends.get(job.session)
                if end is None:
                    end = ends[job.session] = BlockInput(fresh(), device.dtype)
                elif job.cut:
                    end.reset()
                z, level = end.encode(
                    x,
                    (job.latent_hw[0], job.latent_hw[1]),
                    noise_scale=job.noise_scale,
                    controller=job.controller,
                    block_frames=job.block_frames,
                )
                arrays = [z.float().cpu().numpy()]
                answer(Done(job.session, job.block, _ms(started), level, []), arrays)
            else:
                out = ends.get(job.session)
                if out is None:
                    out = ends[job.session] = BlockOutput(
                        fresh(), job.height, job.width, fresh, job.keep
                    )
                elif job.cut:
                    out.reset()
                frames = torch.stack(out.decode(x)).cpu().numpy()
                arrays = [frames]
                if job.reencode:
                    arrays.append(out.reencode().float().cpu().numpy())
                answer(Done(job.session, job.block, _ms(started), None, []), arrays)
        except QueueClosed:
            raise
        except Exception as exc:  # the session fails; the stage goes on
            logger.exception("%s job failed for session %s", config.role, job.session)
            ends.pop(job.session, None)
            failed = Failed(job.session, job.block, f"{type(exc).__name__}: {exc}")
            answers.put(_encoder.encode(failed), alive=alive)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


# ---------------------------------------------------------------- the inference process's side


@dataclass
class Answer:
    """A job's answer in the inference process: its arrays (copies) and the stage's figures."""

    arrays: list[np.ndarray]
    ms: float
    noise_level: float | None


class VaeStage:
    """One stage process, seen from the inference process."""

    def __init__(
        self, config: StageConfig, run_id: str, name: str, job_bytes: int, answer_bytes: int
    ) -> None:
        self.config = config
        self.jobs = BlockQueue.create(run_id, f"{name}~jobs", QUEUE_SLOTS, job_bytes)
        self.answers = BlockQueue.create(run_id, f"{name}~answers", QUEUE_SLOTS, answer_bytes)
        ctx = multiprocessing.get_context("spawn")
        self.process = ctx.Process(
            target=run_stage,
            args=(config, self.jobs.handle, self.answers.handle),
            name=name,
            daemon=True,
        )
        self._pending: dict[tuple[str, int], Future[Answer]] = {}
        self._lock = threading.Lock()  # the pending answers
        self._put_lock = threading.Lock()  # one writer into the jobs queue at a time
        self.lost: str | None = None
        self._closing = False
        self.device, self.pid = "", 0
        self.process.start()

    def wait_ready(self) -> VaeStage:
        """Wait for the process to have loaded its VAE (stages load side by side)."""
        try:
            hello = self._hello()
        except BaseException:
            self.close()
            raise
        self.device, self.pid = hello.device, hello.pid
        receiver = threading.Thread(
            target=self._receive, name=f"{self.process.name}-answers", daemon=True
        )
        receiver.start()
        return self

    def _alive(self) -> bool:
        return self.process.is_alive()

    def _hello(self) -> Hello:
        try:
            message = self.answers.get(timeout=STAGE_START_TIMEOUT_S, alive=self._alive)
        except QueueClosed:
            raise StageLost(
                f"{self.config.role} stage exited while loading (exit {self.process.exitcode}): "
                "see its log"
            ) from None
        if message is None:
            raise StageLost(f"{self.config.role} stage did not start in {STAGE_START_TIMEOUT_S} s")
        hello = _outbound.decode(message.header)
        assert isinstance(hello, Hello)
        return hello

    def submit(self, job: Encode | Decode, arrays: list[np.ndarray]) -> Future[Answer]:
        """Queue a job (waiting while the stage's inbox is full); its answer comes through the
        future, or :class:`StageLost`."""
        job.layout = pack(arrays)
        done: Future[Answer] = Future()
        key = (job.session, job.block)
        with self._lock:
            if self.lost is not None:
                raise StageLost(self.lost)
            self._pending[key] = done
        # Not under _lock: the receiver must go on taking answers while this waits for room.
        with self._put_lock:
            try:
                self.jobs.put(_encoder.encode(job), arrays, alive=self._alive)
            except BaseException:
                with self._lock:
                    self._pending.pop(key, None)
                if self.lost is not None or not self._alive():
                    raise StageLost(self.lost or self._death()) from None
                raise
        return done

    def end(self, session: str) -> None:
        """Drop the session's VAE end (after the jobs before it)."""
        if self.lost is not None:
            return
        with self._put_lock, contextlib.suppress(QueueClosed):  # a death: the receiver says
            self.jobs.put(_encoder.encode(End(session)), alive=self._alive)

    def _death(self) -> str:
        self.process.join(timeout=1.0)
        return (
            f"{self.config.role} stage of {self.config.pipeline_id} (pid {self.process.pid}) "
            f"died (exit {self.process.exitcode})"
        )

    def _receive(self) -> None:
        while True:
            try:
                message = self.answers.get(alive=self._alive)
            except QueueClosed:
                break
            except (ValueError, OSError):  # closed under us
                return
            assert message is not None
            reply = _outbound.decode(message.header)
            if isinstance(reply, Hello):
                continue
            with self._lock:
                done = self._pending.pop((reply.session, reply.block), None)
            if done is None:
                continue  # the session ended meanwhile
            if isinstance(reply, Failed):
                done.set_exception(RuntimeError(f"{self.config.role} stage: {reply.error}"))
                continue
            arrays = [a.copy() for a in unpack(message.payload, reply.layout)]
            done.set_result(Answer(arrays, reply.ms, reply.noise_level))
        reason = self._death()
        if not self._closing:
            logger.error("%s", reason)
        with self._lock:
            self.lost = reason
            pending, self._pending = self._pending, {}
        for done in pending.values():
            done.set_exception(StageLost(reason))

    def close(self) -> None:
        """Stop the process (politely, then not) and free the queues."""
        self._closing = True
        if self.process.is_alive() and self.lost is None:
            with contextlib.suppress(QueueClosed, ValueError):
                self.jobs.put(_encoder.encode(Stop()), timeout=1.0, alive=self._alive)
            self.process.join(timeout=5.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5.0)
        self.jobs.close()
        self.answers.close()
