"""The ``supervisor`` command: start, node, keygen, status, stop."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import msgspec

from dreams.worker import add_worker_parser
from services import protocol as p
from services.nodes.wire import keypair
from services.runtime import configure_logging
from supervisor.client import AdminClient, SupervisorUnreachable, find_run_dirs
from supervisor.config import Config, default_run_base, load_config
from supervisor.process import StartupError, Supervisor
from supervisor.profile import add_profile_parser

logger = logging.getLogger("supervisor")


def cmd_start(args: argparse.Namespace) -> int:
    try:
        config = load_config(
            args.config,
            host=args.host,
            port=args.port,
            run_dir=args.run_dir,
            max_sessions=args.max_sessions,
        )
    except Exception as exc:
        print(f"supervisor: bad configuration: {exc}", file=sys.stderr)
        return 2
    return serve(config)


def cmd_node(args: argparse.Namespace) -> int:
    """A media node: the media stages and pipelines of the config, no HTTP server, and a
    link to the front at ``--join``."""
    try:
        config = load_config(args.config, run_dir=args.run_dir)
        if config.node is None:
            raise ValueError(
                "a node's config needs a [node] table (name, secret_key, "
                "front_public_key); see the README"
            )
        node = msgspec.structs.replace(
            config.node, join=args.join or config.node.join, name=args.name or config.node.name
        )
        if not node.join:
            raise ValueError("give --join tcp://FRONT:PORT (or [node] join)")
        config = msgspec.structs.replace(config, node=node, signalling=False, nodes=None)
        config = msgspec.convert(msgspec.to_builtins(config), type(config))
    except Exception as exc:
        print(f"supervisor: bad configuration: {exc}", file=sys.stderr)
        return 2
    return serve(config)


def cmd_keygen(args: argparse.Namespace) -> int:
    """A CURVE key pair for a front or a node (the secret stays in that host's config)."""
    public, secret = keypair()
    print(f'secret_key = "{secret}"\n# public key, for the other side\'s config: "{public}"')
    return 0


def serve(config: Config) -> int:
    configure_logging("supervisor", config.log_level)
    sup = Supervisor(config)
    sup.install_signal_handlers()
    try:
        sup.start()
        if config.node is not None:
            logger.info("media node %s is up, joining %s", config.node.name, config.node.join)
        else:
            logger.info("dreamwire is up: http://%s:%d/", config.host, config.port)
        sup.serve_forever()
    except StartupError as exc:
        if sup.stop_requested:
            logger.info("stopped while starting")
            return 0
        logger.error("%s", exc)
        return 1
    finally:
        sup.shutdown()
    logger.info("stopped cleanly")
    return 0


def _runs(args: argparse.Namespace) -> list[Path]:
    base = Path(args.run_dir) if args.run_dir else default_run_base()
    runs = find_run_dirs(base)
    if not runs:
        print(f"no running supervisor under {base}", file=sys.stderr)
    return runs


def cmd_status(args: argparse.Namespace) -> int:
    runs = _runs(args)
    if not runs:
        return 1
    for run_dir in runs:
        with AdminClient(run_dir) as client:
            try:
                report = client.status()
            except SupervisorUnreachable as exc:
                print(exc, file=sys.stderr)
                return 1
        print(
            f"run {report.run_id}  {report.phase}  supervisor pid {report.pid}  "
            f"up {report.uptime_s:.0f} s  sessions {len(report.sessions)}"
        )
        print(
            f"  {'SERVICE':<34} {'STATE':<11} {'PID':>7} {'UPTIME':>8} {'RESTARTS':>8} "
            f"{'GPU FREE':>9}  ERROR"
        )
        for s in report.services:
            pid = str(s.pid) if s.pid else "-"
            free = "-" if s.memory_free_bytes is None else f"{s.memory_free_bytes / 2**30:.1f} G"
            print(
                f"  {s.name:<34} {s.state:<11} {pid:>7} {s.uptime_s:>7.0f}s {s.restarts:>8} "
                f"{free:>9}  {s.last_error}"
            )
        for n in report.nodes:
            loaded = ", ".join(s.pipeline_id for s in n.pipelines if s.status == "loaded")
            rtt = "-" if n.rtt_ms is None else f"{n.rtt_ms:.1f} ms"
            state = "up" if n.up else f"lost: {n.reason}"
            print(
                f"  node {n.node:<29} {state:<11} {n.address or '-':>16} rtt {rtt:>9} "
                f"sessions {len(n.sessions)}  pipelines {loaded or '-'}"
            )
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    runs = _runs(args)
    if not runs:
        return 1
    for run_dir in runs:
        with AdminClient(run_dir) as client:
            try:
                reply = client.request(p.Shutdown(reason="supervisor stop"))
            except SupervisorUnreachable as exc:
                print(exc, file=sys.stderr)
                return 1
        print(f"stopping {run_dir.name}: {type(reply).__name__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="supervisor", description="Run dreamwire.")
    parser.add_argument("--run-dir", help="base directory of run directories")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run the server in the foreground")
    start.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    start.add_argument("--port", type=int, help="HTTP port (default 8000)")
    start.add_argument("--config", help="TOML config file")
    start.add_argument(
        "--max-sessions", type=int, help="concurrent WebRTC sessions; the next offer gets 429"
    )
    start.set_defaults(func=cmd_start)
    node = sub.add_parser(
        "node", help="run a media node of a front on another host (no HTTP server)"
    )
    node.add_argument("--join", help="the front's nodes address, tcp://FRONT:PORT")
    node.add_argument("--config", required=True, help="TOML config file with a [node] table")
    node.add_argument("--name", help="this node's name (default: [node] name)")
    node.set_defaults(func=cmd_node)
    sub.add_parser("keygen", help="print a new CURVE key pair for [nodes] / [node]").set_defaults(
        func=cmd_keygen
    )
    sub.add_parser("status", help="show the running services").set_defaults(func=cmd_status)
    sub.add_parser("stop", help="stop the running server").set_defaults(func=cmd_stop)
    add_worker_parser(sub)
    add_profile_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
