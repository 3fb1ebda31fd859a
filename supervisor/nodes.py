"""The front's view of its media nodes, for placing sessions on them. No I/O.

The front's link (``services.nodes.front``) reports each node on every beat; this table keeps
the latest report and answers where a session's chain could run on each node that is up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services import protocol as p
from services import topology
from services.inference import registry
from supervisor.settle import pick_mode


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a session could run: its stages, and the room there."""

    stages: list[str]
    pipeline_ids: tuple[str, ...]
    room: topology.Room
    mode: p.Mode = "video"


class NodeTable:
    def __init__(self) -> None:
        self.reports: dict[str, p.NodeReport] = {}
        #: The pipelines (and load params) the front last asked its nodes for: until a node
        #: reports them loaded so, they are loading there, whatever it said before.
        self.wanted: dict[str, dict[str, object]] | None = None

    def states(self, report: p.NodeReport) -> list[p.PipelineState]:
        """The node's pipelines as the front may use them (see :attr:`wanted`)."""
        if self.wanted is None:
            return list(report.pipelines)
        out = []
        for state in report.pipelines:
            wanted = self.wanted.get(state.pipeline_id)
            if wanted is None:
                continue  # being unloaded there
            if state.status == "loaded" and state.load_params != wanted:
                state = p.PipelineState(state.pipeline_id, "loading", dict(wanted))
            out.append(state)
        return out

    def update(self, report: p.NodeReport) -> bool:
        """Keep the node's latest report; True when it was not up before (it (re)joined)."""
        before = self.reports.get(report.node)
        if not report.up and before is not None:
            # A loss keeps what the node last said, for status.
            report = p.NodeReport(
                node=report.node,
                up=False,
                reason=report.reason,
                pipelines=before.pipelines,
                address=before.address,
            )
        self.reports[report.node] = report
        return report.up and (before is None or not before.up)

    def up(self) -> list[p.NodeReport]:
        return [r for r in self.reports.values() if r.up]

    def placements(
        self, asked: Sequence[str] | None, modes: Sequence[p.Mode], placed: dict[str, int]
    ) -> list[Placement]:
        """The chain on each node that is up and has its pipelines loaded; ``placed`` counts
        the sessions the front has put on each node (the node's beat may not show them yet)."""
        out = []
        for report in self.up():
            loaded = [s.pipeline_id for s in self.states(report) if s.status == "loaded"]
            try:
                chain = topology.plan_chain(loaded, asked, overlays=registry.overlays())
            except topology.ChainError:
                continue
            mode = pick_mode(chain.pipeline_id, modes)
            free = [
                r.free_bytes
                for r in report.rooms
                if topology.StageAddress.parse(r.service).process in chain.processing
                and r.free_bytes is not None
            ]
            room = topology.Room(
                topology.node_stage(report.node, ""),
                max(free) if free else None,
                placed.get(report.node, 0),
            )
            stages = [topology.node_stage(report.node, s) for s in chain.stages(mode)]
            out.append(Placement(stages, chain.pipeline_ids, room, mode))
        return out

    def pipeline_states(self) -> list[p.PipelineState]:
        """Each pipeline's best state over the nodes that are up (loaded on any: loaded)."""
        rank = {"loaded": 0, "loading": 1, "error": 2, "not_loaded": 3}
        best: dict[str, p.PipelineState] = {}
        for report in self.up():
            for state in self.states(report):
                held = best.get(state.pipeline_id)
                if held is None or rank.get(state.status, 9) < rank.get(held.status, 9):
                    best[state.pipeline_id] = state
        return list(best.values())
