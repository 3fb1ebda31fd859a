"""The supervisor's sessions: where each one runs (placement), the rings between its stages,
opening and closing them, and telling the owner when one fails. No I/O: rings are made through
a :class:`RingStore` port, messages leave as effects.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

from services import protocol as p
from services import topology
from services.inference import registry
from services.inference.catalog import PipelineCatalog
from shm.ring import RingError, RingStats
from supervisor.children import Children, State
from supervisor.config import Config
from supervisor.events import Effect, Send
from supervisor.nodes import NodeTable, Placement
from supervisor.settle import InvalidRequest, check_loaded, pick_mode, settle

logger = logging.getLogger(__name__)


class RingStore(Protocol):
    """Where session rings live (shared memory; a dict in tests)."""

    def create(self, key: str, slots: int, nbytes: int) -> str: ...
    def free(self, name: str) -> None: ...
    def stats(self, name: str) -> RingStats: ...
    def room(self, slots: int, nbytes: int) -> tuple[int, int]:
        """(bytes one such ring takes, bytes free where rings live)."""
        ...


class NoRoom(RuntimeError):
    """Not enough shared memory for a session's rings: the server is full, not the request
    wrong (503)."""


@dataclass
class ChainSession:
    """A session as the supervisor keeps it: its chain of stages and the rings between."""

    session_id: str
    stages: list[str]
    width: int
    height: int
    sink: str | None
    params: dict[str, object]
    owner: str | None = None
    mode: p.Mode = "video"
    codec: p.VideoCodec = "VP8"
    rings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: The media node it runs on (None: here); its stages are ``node/<name>/…``.
    node: str | None = None
    opened_at: float = 0.0

    def start_message(self, stage: str) -> p.StartSession:
        i = self.stages.index(stage)
        return p.StartSession(
            session_id=self.session_id,
            width=self.width,
            height=self.height,
            input_ring=self.rings[i - 1] if i > 0 else None,
            output_ring=self.rings[i] if i < len(self.rings) else None,
            downstream=self.stages[i + 1] if i + 1 < len(self.stages) else self.sink,
            params=dict(self.params),
            mode=self.mode,
            codec=self.codec,
        )


class SessionTable:
    """Every open session (here or on a media node) and its rings."""

    def __init__(
        self, config: Config, children: Children, rings: RingStore, nodes: NodeTable
    ) -> None:
        self.config = config
        self.children = children
        self.rings = rings
        self.nodes = nodes
        self.sessions: dict[str, ChainSession] = {}
        self.catalog = PipelineCatalog()

    def __contains__(self, session_id: str) -> bool:
        return session_id in self.sessions

    # ------------------------------------------------------------ opening

    def open(
        self,
        req: p.OpenSession,
        pipeline_order: list[str],
        states: list[p.PipelineState],
        now: float,
    ) -> tuple[p.SessionOpened, list[Effect]]:
        """Plan (or take) the chain, settle its size, mode and parameters, make its rings,
        start it in every stage. Raises ``ValueError`` for a request that cannot be served
        (:class:`~supervisor.settle.NotLoaded`, :class:`~supervisor.settle.InvalidRequest`,
        ``ChainError`` among them), :class:`NoRoom` when shared memory is short."""
        if req.session_id in self.sessions:
            raise ValueError(f"session {req.session_id!r} already exists")
        if not req.session_id.replace("-", "").isalnum() or len(req.session_id) > 64:
            raise ValueError("session_id must be 1-64 letters, digits or '-'")
        if not req.modes:
            raise InvalidRequest("modes: no mode offered")
        opened = p.SessionOpened(req.session_id, stages=[], rings=[], mode=req.modes[0])
        if req.stages:
            if req.pipeline_ids:
                raise ValueError("give pipeline_ids or stages, not both")
            stages = list(req.stages)
            opened.width, opened.height, opened.params = req.width, req.height, dict(req.params)
        else:
            check_loaded(states)
            placement = self._place(req, pipeline_order)
            settled = settle(req, placement.pipeline_ids, states, self.catalog)
            opened.pipeline_ids = list(placement.pipeline_ids)
            opened.width, opened.height = settled.width, settled.height
            opened.mode, opened.params = placement.mode, settled.params
            opened.unknown, opened.load_time = list(settled.unknown), list(settled.load_time)
            if (node := topology.StageAddress.parse(placement.stages[0]).node) is not None:
                return self._open_on_node(req, opened, node, placement, now)
            stages = placement.stages
        unknown = [s for s in stages if s not in self.children]
        if unknown or not stages:
            raise ValueError(
                f"unknown stage(s): {', '.join(unknown) or '(none given)'}"
                f" (this server runs: {', '.join(self.children) or 'nothing'})"
            )
        self._check_size(opened.width, opened.height)
        session = ChainSession(
            req.session_id, stages, opened.width, opened.height, req.sink, opened.params,
            owner=req.owner, mode=opened.mode, codec=req.codec, opened_at=now,
        )  # fmt: skip
        self._make_rings(session)
        self.sessions[req.session_id] = session
        effects: list[Effect] = []
        for stage in stages:
            effects += self.children.send_to(stage, session.start_message(stage))
        logger.info("session %s opened: %s", req.session_id, " → ".join(stages))
        opened.stages, opened.rings = stages, list(session.rings)
        return opened, effects

    def _make_rings(self, session: ChainSession) -> None:
        slots = self.config.ring_slots
        frame_bytes = session.width * session.height * 3
        ring_bytes, free = self.rings.room(slots, frame_bytes)
        needed = ring_bytes * (len(session.stages) - 1)
        no_room = (
            f"no room in /dev/shm for a {session.width}×{session.height} session: "
            f"{needed / 2**20:.1f} MB needed, {free / 2**20:.1f} MB free"
        )
        if needed > free:
            raise NoRoom(no_room)
        try:
            for i in range(len(session.stages) - 1):
                key = f"{session.session_id}.{i}"
                session.rings.append(self.rings.create(key, slots, frame_bytes))
        except RingError as exc:  # taken between the check and now, or another failure
            self._free_rings(session)
            raise NoRoom(f"{no_room} ({exc})") from exc
        except Exception:
            self._free_rings(session)
            raise

    def _check_size(self, width: int, height: int) -> None:
        cfg = self.config
        if not (0 < width <= cfg.max_frame_width and 0 < height <= cfg.max_frame_height):
            raise ValueError(
                f"{width}x{height} is outside 1x1..{cfg.max_frame_width}x{cfg.max_frame_height}"
            )

    def _place(self, req: p.OpenSession, pipeline_order: list[str]) -> Placement:
        """The session's chain, planned from its pipelines where they are loaded: here, or on
        a media node; the place with the most room takes it (:func:`topology.place`)."""
        asked = req.pipeline_ids or None
        options: list[Placement] = []
        error: topology.ChainError | None = None
        loaded = self.children.ready_pipelines()
        try:
            ordered = [pid for pid in pipeline_order if pid in loaded]
            chain = topology.plan_chain(
                ordered + [x for x in loaded if x not in ordered],
                asked,
                overlays=registry.overlays(),
            )
        except topology.ChainError as exc:
            error = exc
        else:
            mode = pick_mode(chain.pipeline_id, req.modes)
            stages = [self._placed(stage) for stage in chain.stages(mode)]
            first = next(
                (s for s in stages if topology.StageAddress.parse(s).process in chain.processing),
                stages[0],
            )
            child = self.children.get(first)
            free = child.memory_free_bytes if child is not None else None
            room = topology.Room(first, free, self.sessions_in(first))
            options.append(Placement(stages, chain.pipeline_ids, room, mode))
        placed: dict[str, int] = {}
        for session in self.sessions.values():
            if session.node is not None:
                placed[session.node] = placed.get(session.node, 0) + 1
        options += self.nodes.placements(asked, req.modes, placed)
        if not options:
            remote = self.nodes.pipeline_states()
            everywhere = loaded + [s.pipeline_id for s in remote if s.status == "loaded"]
            # raises, naming what is missing
            topology.plan_chain([s for s in everywhere if s], asked, overlays=registry.overlays())
            raise error or topology.ChainError(
                f"pipeline_ids: no server has all of {', '.join(asked or everywhere)} loaded"
            )
        best = topology.place([o.room for o in options])
        return next(o for o in options if o.room.service == best)

    def _placed(self, stage: str) -> str:
        """A pipeline's per-device processes: the one with the most room takes the session."""
        if stage in self.children:
            return stage
        rooms = [
            topology.Room(c.name, c.memory_free_bytes, self.sessions_in(c.name))
            for c in self.children.values()
            if topology.StageAddress.parse(c.name).process == stage and c.state is State.READY
        ]
        return topology.place(rooms) if rooms else stage

    def _open_on_node(
        self,
        req: p.OpenSession,
        opened: p.SessionOpened,
        node: str,
        placement: Placement,
        now: float,
    ) -> tuple[p.SessionOpened, list[Effect]]:
        """A session on a media node: its rings are the node's; the front's link carries the
        settled request there (a failure comes back as ``SessionFailed``)."""
        self._check_size(opened.width, opened.height)
        session = ChainSession(
            req.session_id, placement.stages, opened.width, opened.height, req.sink,
            opened.params, owner=req.owner, mode=opened.mode, codec=req.codec, node=node,
            opened_at=now,
        )  # fmt: skip
        self.sessions[req.session_id] = session
        request = p.OpenSession(
            session_id=req.session_id,
            width=opened.width,
            height=opened.height,
            pipeline_ids=list(placement.pipeline_ids),
            params=dict(opened.params),
            modes=[opened.mode],
            codec=req.codec,
        )
        logger.info(
            "session %s opened on node %s: %s", req.session_id, node, " → ".join(session.stages)
        )
        opened.stages = list(session.stages)
        return opened, self.to_node(node, request)

    # ------------------------------------------------------------ life and end

    def close(self, session_id: str) -> list[Effect]:
        session = self.sessions.pop(session_id)
        if session.node is not None:
            logger.info("session %s closed (node %s)", session_id, session.node)
            return self.to_node(session.node, p.CloseSession(session_id))
        effects: list[Effect] = []
        for stage in session.stages:
            effects += self.children.send_to(stage, p.EndSession(session_id=session_id))
        self._free_rings(session)
        logger.info("session %s closed", session_id)
        return effects

    def close_all(self) -> None:
        for session_id in list(self.sessions):
            self._free_rings(self.sessions.pop(session_id))

    def _free_rings(self, session: ChainSession) -> None:
        for ring in session.rings:
            self.rings.free(ring)
        session.rings.clear()

    def fail(self, session_id: str, service: str, reason: str) -> list[Effect]:
        """A session can no longer be served: its owner (signalling) tells the client."""
        return self.notify_owner(p.SessionFailed(session_id, service, reason))

    def notify_owner(self, msg: p.SessionFailed) -> list[Effect]:
        session = self.sessions.get(msg.session_id)
        if session is None:
            return []
        session.failures.append(msg.reason)
        return list(self.children.send_to(session.owner or "", msg))

    def owned_by(self, owner: str) -> list[str]:
        return [sid for sid, s in self.sessions.items() if s.owner == owner]

    def through(self, stage: str) -> list[ChainSession]:
        return [s for s in self.sessions.values() if stage in s.stages]

    def starts_for(self, stage: str, route: bytes) -> list[Effect]:
        """A stage (re)started: the sessions it belongs to, started in it anew."""
        return [Send(route, s.start_message(stage)) for s in self.through(stage)]

    def sessions_in(self, service: str) -> int:
        return sum(1 for s in self.sessions.values() if service in s.stages)

    def to_node(
        self, node: str, request: p.OpenSession | p.CloseSession | p.LoadPipelines
    ) -> list[Effect]:
        return list(self.children.send_to(topology.NODES, p.ToNode(node, request)))

    # ------------------------------------------------------------ media nodes

    def node_report(
        self, report: p.NodeReport, loads: list[p.PipelineLoad] | None, now: float
    ) -> list[Effect]:
        """A node's beat (or its loss): its sessions stop when it is lost; what it and the
        front disagree on is settled (the front's view wins)."""
        joined = self.nodes.update(report)
        effects: list[Effect] = []
        mine = [s for s in self.sessions.values() if s.node == report.node]
        lost_service = topology.node_stage(report.node, "")
        if not report.up:
            for session in mine:
                effects += self.fail(session.session_id, lost_service, report.reason)
            return effects
        if joined:
            logger.info("media node %s is up (%s)", report.node, report.address)
            if loads is not None:
                effects += self.to_node(report.node, p.LoadPipelines(list(loads)))
        for session_id in set(report.sessions) - {s.session_id for s in mine}:
            effects += self.to_node(report.node, p.CloseSession(session_id))
        grace = self.config.heartbeat_interval_s * 4
        for session in mine:
            if session.session_id not in report.sessions and now - session.opened_at > grace:
                if session.failures:
                    continue  # told once
                reason = f"media node {report.node} no longer serves the session"
                effects += self.fail(session.session_id, lost_service, reason)
        return effects

    # ------------------------------------------------------------ status

    def ring_states(self) -> list[p.RingStatus]:
        """Every session ring's counters (metrics): ring i joins stages i and i+1."""
        out = []
        for session in self.sessions.values():
            for i, ring in enumerate(session.rings):
                st = self.rings.stats(ring)
                out.append(
                    p.RingStatus(
                        session_id=session.session_id,
                        ring=ring,
                        producer=session.stages[i],
                        consumer=session.stages[i + 1],
                        slots=self.config.ring_slots,
                        published=st.published,
                        consumed=st.consumed,
                        skipped=st.skipped,
                        torn=st.torn,
                        pending=st.pending,
                    )
                )
        return out
