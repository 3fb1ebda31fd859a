"""Recordings of sessions' output, as signalling keeps them: which file a session records to,
which finished files can be downloaded, and for how long.

The encode process writes the files (``services.encode.recorder``): signalling sends it a
:class:`~services.protocol.RecordCommand` and hears :class:`~services.protocol.RecordingFinished`
when a file is complete. Scope's contract:

* ``start`` (``initialParameters.recording``, ``POST /api/v1/recordings/{id}/start``):
  ``started`` or ``already_recording``; ``stop``: ``stopped`` or ``not_recording``.
* a download while recording finishes the file so far (the encoder starts the next one at a
  keyframe) and returns it; after, the newest finished file.

A recording outlives its session: its files stay downloadable for ``keep_s`` after they finish,
within ``max_total_bytes`` for all of them (the oldest go first), then are deleted. A file
ends by itself at ``max_bytes`` or ``max_seconds``, or when the disk's free space falls to
``min_free_bytes``; the client is told, and the stream goes on.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services import protocol as p
from services.options import RecordingOptions

logger = logging.getLogger(__name__)

#: How long a stop or download waits for the encode process to finish the file.
FINISH_TIMEOUT_S = 10.0


class RecordingRefused(RuntimeError):
    """A recording cannot start; the message says why."""


@dataclass
class RecordingFile:
    path: Path
    frames: int
    size_bytes: int
    duration_s: float
    reason: str
    #: Wall time the recording began (the download's file name).
    began_at: float
    finished_at: float  # monotonic


@dataclass
class SessionRecording:
    codec: p.VideoCodec
    #: The file being written (None: not recording).
    active: Path | None = None
    #: Wall time each unfinished file began.
    began: dict[Path, float] = field(default_factory=dict)
    files: list[RecordingFile] = field(default_factory=list)
    waiting: dict[Path, asyncio.Future[RecordingFile]] = field(default_factory=dict)
    count: int = 0


class Recordings:
    """``send(session_id, command)`` reaches the session's encode process."""

    def __init__(
        self,
        options: RecordingOptions,
        root: Path,
        send: Callable[[str, p.RecordCommand], object],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self.root = root
        self.send = send
        self.clock = clock
        self.sessions: dict[str, SessionRecording] = {}
        #: Sessions whose encode went away with a file open: it will not finish.
        self.ended: set[str] = set()

    # ------------------------------------------------------------ commands

    def start(self, session_id: str, codec: p.VideoCodec) -> bool:
        """Start recording (False: already). Raises :class:`RecordingRefused` when the disk or
        the recordings' budget has no room."""
        if self.recording(session_id):
            return False
        budget = self._room()  # sweeps first: a session with nothing kept is forgotten there
        rec = self.sessions.setdefault(session_id, SessionRecording(codec))
        path = self._next_path(session_id, rec)
        rec.active, rec.began[path] = path, time.time()
        self.send(session_id, self._command(session_id, "start", path, budget))
        logger.info("session %s: recording to %s", session_id, path)
        return True

    async def stop(self, session_id: str) -> bool:
        """Stop recording (False: it was not); returns once the file is complete."""
        rec = self.sessions.get(session_id)
        if rec is None or rec.active is None:
            return False
        waiting = self._wait_for(rec, rec.active)
        self.send(session_id, p.RecordCommand(session_id=session_id, action="stop"))
        await asyncio.wait_for(asyncio.shield(waiting), FINISH_TIMEOUT_S)
        return True

    async def download(self, session_id: str, live: bool) -> RecordingFile | None:
        """The file to send: while recording (``live``), the recording so far (it goes on in
        a new file); else the newest finished one, once it is complete."""
        rec = self.sessions.get(session_id)
        if rec is None:
            return None
        if rec.active is not None:
            waiting = self._wait_for(rec, rec.active)
            if live:
                try:
                    room = self._room()
                except RecordingRefused as exc:  # no room for more: the recording ends here
                    logger.warning("session %s: recording ends: %s", session_id, exc)
                    self.send(session_id, p.RecordCommand(session_id=session_id, action="stop"))
                else:
                    path = self._next_path(session_id, rec)
                    rec.active, rec.began[path] = path, time.time()
                    self.send(session_id, self._command(session_id, "cut", path, room))
            return await asyncio.wait_for(asyncio.shield(waiting), FINISH_TIMEOUT_S)
        return rec.files[-1] if rec.files else None

    def recording(self, session_id: str) -> bool:
        rec = self.sessions.get(session_id)
        return rec is not None and rec.active is not None

    # ------------------------------------------------------------ from encode

    def finished(self, msg: p.RecordingFinished) -> str | None:
        """A file is complete. Returns what the client should hear (a limit ended it)."""
        rec = self.sessions.get(msg.session_id)
        path = Path(msg.path)
        if rec is None:
            logger.warning("recording %s of an unknown session: deleted", path)
            path.unlink(missing_ok=True)
            return None
        began = rec.began.pop(path, time.time())
        if rec.active == path:  # not a cut: the recording ended
            rec.active = None
        done = RecordingFile(
            path, msg.frames, msg.size_bytes, msg.duration_s, msg.reason, began, self.clock()
        )
        if msg.frames:
            rec.files.append(done)
        else:
            path.unlink(missing_ok=True)
        if (waiting := rec.waiting.pop(path, None)) is not None and not waiting.done():
            waiting.set_result(done)
        if msg.reason in ("stopped", "cut", "session ended"):
            return None
        return f"recording stopped: {msg.reason}"

    def encode_lost(self, session_id: str) -> None:
        """The session's encode process went away: its open file will never be finished."""
        rec = self.sessions.get(session_id)
        if rec is None or rec.active is None:
            return
        path, rec.active = rec.active, None
        error = RecordingRefused(f"the encode process of session {session_id} stopped")
        for waiting in rec.waiting.values():
            if not waiting.done():
                waiting.set_exception(error)
        rec.waiting.clear()
        logger.warning("session %s: recording %s lost with its encode process", session_id, path)

    # ------------------------------------------------------------ keeping

    def sweep(self) -> list[Path]:
        """Delete files past ``keep_s``, then the oldest while over ``max_total_bytes``."""
        now = self.clock()
        files = sorted(
            ((sid, f) for sid, rec in self.sessions.items() for f in rec.files),
            key=lambda item: item[1].finished_at,
        )
        total = sum(f.size_bytes for _, f in files)
        deleted = []
        for sid, f in files:
            if now - f.finished_at > self.options.keep_s or total > self.options.max_total_bytes:
                total -= f.size_bytes
                self.sessions[sid].files.remove(f)
                f.path.unlink(missing_ok=True)
                deleted.append(f.path)
        for sid in [s for s, rec in self.sessions.items() if not rec.files and not rec.active]:
            del self.sessions[sid]
        if deleted:
            logger.info("recordings: deleted %d kept past their time or budget", len(deleted))
        return deleted

    def _room(self) -> int:
        """Bytes the next file may take; raises :class:`RecordingRefused` when none."""
        self.sweep()
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free <= self.options.min_free_bytes:
            raise RecordingRefused(
                f"the disk of {self.root} has {free / 2**20:.0f} MB free, under the "
                f"{self.options.min_free_bytes / 2**20:.0f} MB recordings leave free"
            )
        kept = sum(f.size_bytes for rec in self.sessions.values() for f in rec.files)
        room = min(self.options.max_bytes, self.options.max_total_bytes - kept)
        if room <= 0:
            raise RecordingRefused(
                f"the kept recordings use the whole budget ({kept / 2**20:.0f} MB of "
                f"{self.options.max_total_bytes / 2**20:.0f} MB): download them or wait "
                f"until they expire ({self.options.keep_s:g} s after they finish)"
            )
        return room

    def _command(
        self, session_id: str, action: p.RecordAction, path: Path, max_bytes: int
    ) -> p.RecordCommand:
        return p.RecordCommand(
            session_id=session_id,
            action=action,
            path=str(path),
            max_bytes=max_bytes,
            max_seconds=self.options.max_seconds,
            min_free_bytes=self.options.min_free_bytes,
        )

    def _next_path(self, session_id: str, rec: SessionRecording) -> Path:
        rec.count += 1
        suffix = ".mp4" if rec.codec == "H264" else ".webm"
        return self.root / session_id / f"{rec.count:03d}{suffix}"

    def _wait_for(self, rec: SessionRecording, path: Path) -> asyncio.Future[RecordingFile]:
        if path not in rec.waiting:
            rec.waiting[path] = asyncio.get_running_loop().create_future()
        return rec.waiting[path]


def download_name(recording: RecordingFile) -> str:
    """Scope's name for a downloaded recording, with this file's suffix."""
    stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(recording.began_at))
    return f"recording-{stamp}{recording.path.suffix}"
