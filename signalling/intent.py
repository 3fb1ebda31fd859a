"""What a client's offer asks for, beyond the pipelines' own parameters: the mode and the chain.

Scope's clients say it in several ways, and dreamwire reads them in this order:

* ``input_mode`` (``"video"`` or ``"text"``) in ``initialParameters``: Scope's frontends send it;
* the SDP: a video m-section the client does not send on (``recvonly``, ``inactive``) is text
  mode; so is one it could send on (``sendrecv``) when the pipeline takes no video, or when the
  client attached no media stream to it and the pipeline can generate. Browsers write
  ``a=msid:- <track>`` for a transceiver added with ``addTransceiver("video")`` and no stream,
  which is how Scope's text mode and its docs' receive-only example offer;
* ``pipeline_ids`` or (Scope 0.2) ``graph``: which of the loaded pipelines the session runs, in
  order. A graph must be a linear chain ``source → pipeline → … → sink``; its node ids address
  per-node data-channel messages (``node_id``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from services.inference.catalog import ParameterError
from services.protocol import Mode

_DIRECTIONS = ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive")


@dataclass(frozen=True)
class Intent:
    """The session-level part of ``initialParameters``."""

    #: ``input_mode`` when the client gave it.
    mode: Mode | None = None
    #: The chain the client asked for (``pipeline_ids`` or the graph's pipeline nodes).
    pipeline_ids: tuple[str, ...] | None = None
    #: Graph node id -> pipeline id (0.2's ``node_id`` messages).
    nodes: dict[str, str] = field(default_factory=dict)
    #: ``recording``: record the output from the start (``signalling.recordings``).
    recording: bool = False
    #: The graph's record nodes (0.2): they start and stop recordings themselves, so the
    #: session-level ``recording`` is not theirs (Scope ignores it then too).
    record_nodes: frozenset[str] = frozenset()


def read_intent(params: dict[str, Any]) -> Intent:
    """The session-level keys of ``initialParameters``; raises ParameterError naming a bad one."""
    mode = params.get("input_mode")
    if mode is not None and mode not in ("video", "text"):
        raise ParameterError(f'input_mode: expected "video" or "text", got {mode!r}')
    pipeline_ids: tuple[str, ...] | None = None
    nodes: dict[str, str] = {}
    record_nodes: frozenset[str] = frozenset()
    if "graph" in params and params["graph"] is not None:
        pipeline_ids, nodes = graph_chain(params["graph"])
        record_nodes = frozenset(
            n["id"] for n in params["graph"]["nodes"] if n.get("type") == "record"
        )
    elif params.get("pipeline_ids") is not None:
        ids = params["pipeline_ids"]
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise ParameterError("pipeline_ids: expected a list of pipeline ids")
        pipeline_ids = tuple(ids) or None
    recording = params.get("recording", False)
    if not isinstance(recording, bool):
        raise ParameterError(f"recording: expected true or false, got {recording!r}")
    return Intent(
        mode=mode,
        pipeline_ids=pipeline_ids,
        nodes=nodes,
        recording=recording,
        record_nodes=record_nodes,
    )


def graph_chain(graph: Any) -> tuple[tuple[str, ...], dict[str, str]]:
    """The pipelines of a Scope 0.2 graph, in stream order, and its node id -> pipeline id map.

    Only a linear chain runs here: an optional source, one or more pipeline nodes, a sink, joined
    by stream edges (parameter edges and record nodes are UI matters and are left alone).
    """
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise ParameterError("graph: expected an object with a list of nodes")
    nodes: dict[str, dict[str, Any]] = {}
    for node in graph["nodes"]:
        if not isinstance(node, dict) or not isinstance(node.get("id"), str):
            raise ParameterError("graph: every node needs a string id")
        nodes[node["id"]] = node
    pipelines: dict[str, str] = {}
    for nid, node in nodes.items():
        if node.get("type") != "pipeline":
            continue
        pid = node.get("pipeline_id")
        if not isinstance(pid, str) or not pid:
            raise ParameterError(f"graph: pipeline node {nid!r} has no pipeline_id")
        pipelines[nid] = pid
    others = sorted(
        f"{nid} ({n.get('type')})"
        for nid, n in nodes.items()
        if n.get("type") not in ("source", "pipeline", "sink", "record")
    )
    if others:
        raise ParameterError(
            "graph: dreamwire runs a linear chain source → pipelines → sink; it has no node "
            "type for " + ", ".join(others)
        )
    if not pipelines:
        raise ParameterError("graph: no pipeline node")
    after: dict[str, list[str]] = {}
    before: dict[str, list[str]] = {}
    for edge in graph.get("edges") or []:
        if not isinstance(edge, dict):
            raise ParameterError("graph: every edge must be an object")
        if edge.get("kind", "stream") != "stream":
            continue
        src, dst = edge.get("from"), edge.get("to_node")
        if src not in nodes or dst not in nodes:
            raise ParameterError(f"graph: edge {src!r} → {dst!r} names an unknown node")
        if nodes[dst].get("type") == "record" or nodes[src].get("type") == "record":
            continue
        if dst not in after.setdefault(src, []):
            after[src].append(dst)
        if src not in before.setdefault(dst, []):
            before[dst].append(src)
    heads = [nid for nid in pipelines if not any(b in pipelines for b in before.get(nid, []))]
    if len(heads) != 1:
        raise ParameterError(
            "graph: dreamwire runs one linear chain of pipelines; this graph has "
            f"{len(heads)} starting points ({', '.join(sorted(heads))})"
        )
    order = [heads[0]]
    while True:
        nxt = [n for n in after.get(order[-1], []) if n in pipelines]
        if len(nxt) > 1 or len(after.get(order[-1], [])) > 1:
            raise ParameterError(f"graph: node {order[-1]!r} branches; dreamwire runs one chain")
        if not nxt:
            break
        if nxt[0] in order:
            raise ParameterError(f"graph: the stream loops back to {nxt[0]!r}")
        order.append(nxt[0])
    if len(order) != len(pipelines):
        missing = sorted(set(pipelines) - set(order))
        raise ParameterError(f"graph: pipeline nodes {', '.join(missing)} are not in the chain")
    return tuple(pipelines[nid] for nid in order), {nid: pipelines[nid] for nid in order}


def _video_section(sdp: str) -> tuple[str, bool]:
    """(direction, whether the client attached a media stream) of the first video m-section."""
    in_video = False
    direction = "sendrecv"
    has_stream = False
    for line in sdp.splitlines():
        line = line.strip()
        if line.startswith("m="):
            if in_video:
                break
            in_video = line.startswith("m=video")
        elif in_video and line in _DIRECTIONS:
            direction = line[2:]
        elif in_video and line.startswith("a=msid:"):
            stream = line[len("a=msid:") :].split(" ", 1)[0]
            has_stream = stream not in ("", "-")
    return direction, has_stream


def offer_modes(sdp: str, asked: Mode | None) -> list[Mode]:
    """The modes a session may run in, the client's preference first: what it asked for
    (``input_mode``), else what its SDP says (a camera it sends: video, then text; no
    camera: text, then video; an offer that only receives: text). The supervisor takes the
    first the chain's first pipeline supports."""
    if asked is not None:
        return [asked]
    direction, has_stream = _video_section(sdp)
    if direction in ("recvonly", "inactive"):
        return ["text"]
    return ["video", "text"] if has_stream else ["text", "video"]
