"""The loaded pipelines: which processes a load wants, which it keeps, which it stops, and
each pipeline's status (loading, loaded, error) here and on the media nodes. No I/O."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from services import protocol as p
from supervisor.children import Child, Children, State
from supervisor.config import Config, ServiceConfig
from supervisor.events import Effect, Kill, Spawn
from supervisor.nodes import NodeTable
from supervisor.plan import pipeline_services, same_load
from supervisor.sessions import SessionTable

Add = Callable[[ServiceConfig], list[Effect]]


class PipelineSet:
    def __init__(
        self,
        config: Config,
        models_dir: Path,
        children: Children,
        sessions: SessionTable,
        nodes: NodeTable,
    ) -> None:
        self.config = config
        self.models_dir = models_dir
        self.children = children
        self.sessions = sessions
        self.nodes = nodes
        #: The pipelines last asked for, in order (the first is the one status reports).
        self.order: list[str] = list(config.pipelines)
        #: The pipelines a client last asked for (a node that joins later is given them).
        self.loads: list[p.PipelineLoad] | None = None
        #: Processes replaced under their name (an unload still stopping, then a new load):
        #: by pid, until their exit is seen.
        self.retiring: dict[int, Child] = {}

    def load(self, loads: list[p.PipelineLoad], add: Add, now: float) -> list[Effect]:
        """Start the processes asked for; stop those no longer wanted. A process whose load
        changes only session settings (not its ``load_keys``) stays."""
        wanted: dict[str, ServiceConfig] = {}
        load_keys: dict[str, list[str]] = {}
        for load in loads:
            pid = load.pipeline_id
            if not pid or not all(c.isalnum() or c in "-_." for c in pid) or len(pid) > 64:
                raise ValueError(f"invalid pipeline id {pid!r}")
            if not self.config.local_pipelines:
                continue
            for svc in pipeline_services(self.config, self.models_dir, pid, load.load_params):
                wanted[svc.name] = svc
                load_keys[svc.name] = load.load_keys
        self.loads = list(loads)
        self.nodes.wanted = {load.pipeline_id: dict(load.load_params) for load in loads}
        effects: list[Effect] = []
        for node in self.nodes.up():
            effects += self.sessions.to_node(node.node, p.LoadPipelines(list(loads)))
        for name, child in list(self.children.items()):
            if not child.is_pipeline or child.removing:
                continue
            same = wanted.get(name)
            if same is not None and same_load(child.spec.options, same.options, load_keys[name]):
                # Only session settings changed (Scope's UI sends them with every load): the
                # process stays; status shows them and new sessions take them as defaults.
                child.spec.options["load_params"] = same.options.get("load_params", {})
                if child.state is State.FAILED:  # asked again after a failed load: once more
                    child.retry()
                    effects.append(Spawn(child.spec))
                continue
            effects += self.unload(child, now)
        for name, svc in wanted.items():
            current = self.children.get(name)
            if current is not None and not current.removing:
                continue
            if current is not None and current.pid is not None:
                # Still stopping with other load params: killed, replaced under the same name.
                self.retiring[current.pid] = current
                effects.append(Kill(current.pid))
            effects += add(svc)
        self.order = [load.pipeline_id for load in loads]
        return effects

    def unload(self, child: Child, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for session in self.sessions.through(child.name):
            reason = f"{child.name} was unloaded"
            effects += self.sessions.fail(session.session_id, child.name, reason)
        if child.pid is None:
            del self.children[child.name]
            return effects
        effects += self.children.send(child, p.Stop(reason="unloaded"))
        child.stop(now, self.config.stop_timeout_s, removing=True)
        return effects

    def states(self) -> list[p.PipelineState]:
        """A pipeline is loaded while one of its processes (one per device) is up: sessions go
        to those; an error only when all failed; else loading."""
        states = []
        on_nodes = {s.pipeline_id: s for s in self.nodes.pipeline_states()}
        for pid in self.order:
            children = self.children.of_pipeline(pid)
            remote = on_nodes.pop(pid, None)
            if remote is not None and (
                remote.status == "loaded" or not any(c.state is State.READY for c in children)
            ):
                states.append(remote)  # loaded on a node, and not (or not better) here
                continue
            if not children:
                continue
            status: p.PipelineStatus
            if any(c.state is State.READY for c in children):
                status = "loaded"
            elif all(c.state is State.FAILED for c in children):
                status = "error"
            else:
                status = "loading"
            failed = next((c for c in children if c.state is State.FAILED), children[0])
            ready = next((c for c in children if c.state is State.READY), None)
            states.append(
                p.PipelineState(
                    pipeline_id=pid,
                    status=status,
                    load_params=dict(children[0].spec.options.get("load_params", {})),
                    error=(failed.failure_reason or failed.last_error)
                    if status == "error"
                    else None,
                    loras=list(ready.loras) if ready is not None else [],
                )
            )
        return states + list(on_nodes.values())
