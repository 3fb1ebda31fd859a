"""The background thread that runs the model, so the video never waits for it.

One thread, so at most one inference is in flight (the model and its device are one). Each
session has at most one job *waiting*: a newer frame replaces the one still waiting (counted in
``replaced``). Waiting jobs are served oldest first. Finished jobs are collected by the owner's
thread with :meth:`ModelRunner.poll`; this thread touches no socket.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.overlay.model import FeatureRequest

logger = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 2.0


@dataclass(slots=True)
class ModelJob:
    session_id: str
    seq: int  # increasing per runner: orders results
    key: tuple[str, ...]  # MoondreamConfig.result_key() when submitted
    request: FeatureRequest
    image: np.ndarray  # a private copy of the frame
    frame_number: int
    submitted_at: float  # time.monotonic()


@dataclass(slots=True)
class ModelOutcome:
    session_id: str
    seq: int
    key: tuple[str, ...]
    request: FeatureRequest
    frame_number: int
    submitted_at: float
    duration_s: float
    result: dict[str, Any] | None = None
    error: str | None = None


RunFn = Callable[[FeatureRequest, np.ndarray], dict[str, Any]]


class ModelRunner:
    """Runs ``run(request, image)`` for submitted jobs on one named background thread."""

    def __init__(self, run: RunFn, name: str = "overlay.model") -> None:
        self._run = run
        self._cond = threading.Condition()
        self._waiting: dict[str, ModelJob] = {}
        self._in_flight: ModelJob | None = None
        self._done: collections.deque[ModelOutcome] = collections.deque()
        self._stopping = False
        self.replaced = 0
        self.completed = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: ModelJob) -> None:
        with self._cond:
            if self._waiting.pop(job.session_id, None) is not None:
                self.replaced += 1
            self._waiting[job.session_id] = job
            self._cond.notify_all()

    def cancel(self, session_id: str) -> None:
        """Forget a session's waiting job (one in flight finishes and is ignored by the owner)."""
        with self._cond:
            self._waiting.pop(session_id, None)

    def busy(self) -> bool:
        with self._cond:
            return self._in_flight is not None or bool(self._waiting)

    def poll(self) -> list[ModelOutcome]:
        """Finished jobs since the last poll, oldest first."""
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing waits or runs (tests, shutdown); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._in_flight is None and not self._waiting, timeout_s
            )

    def close(self) -> None:
        """Stop the thread (idempotent); a model call in progress is not interrupted."""
        with self._cond:
            self._stopping = True
            self._waiting.clear()
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(JOIN_TIMEOUT_S)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or bool(self._waiting))
                if self._stopping:
                    return
                session_id = next(iter(self._waiting))
                job = self._waiting.pop(session_id)
                self._in_flight = job
            outcome = self._execute(job)
            with self._cond:
                self._done.append(outcome)
                self._in_flight = None
                self.completed += 1
                self._cond.notify_all()

    def _execute(self, job: ModelJob) -> ModelOutcome:
        started = time.monotonic()
        outcome = ModelOutcome(
            session_id=job.session_id,
            seq=job.seq,
            key=job.key,
            request=job.request,
            frame_number=job.frame_number,
            submitted_at=job.submitted_at,
            duration_s=0.0,
        )
        try:
            outcome.result = self._run(job.request, job.image)
        except Exception as exc:
            logger.warning(
                "session %s: moondream %s failed: %s",
                job.session_id,
                job.request.feature.value,
                exc,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.duration_s = time.monotonic() - started
        return outcome
