#!/usr/bin/env python3
"""Media nodes benchmark: the same K sessions on one box, and spread over two media nodes.

Both topologies run in network namespaces on this machine (``scripts/netlab.py``; needs root),
and the clients (``scripts/client.py``, K aiortc clients sending a 30 fps test pattern
through ``passthrough``) talk to the front from this machine's own namespace over a veth, so
the client side is the same for both:

* ``one-box``: ``supervisor start`` in the front's namespace runs everything;
* ``two-nodes``: the front runs signalling and the ``nodes`` link only (``media = false``);
  ``supervisor node`` in two other namespaces runs decode → passthrough → encode, each joined
  to the front over its own veth with CURVE (``--delay-ms`` adds latency to the second one:
  netem where the kernel has it, else a delaying TCP relay).

Reported per topology and K: fps per session (min / mean), end-to-end latency p50/p95 (first
RTP packet in → last RTP packet out, the frames' own stamps), the mean per stage (with
``to_node`` / ``from_node``, the network hops), CPU % per process (100 = one core; every
process of every host). All hosts share this machine's cores: it measures what the split
costs in CPU and milliseconds, not what more machines would add.

    sudo python scripts/bench_nodes.py [--sessions 1,2,4] [--duration 8] [--delay-ms 0] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import netlab  # noqa: E402
from bench_e2e import (  # noqa: E402
    CpuMeter,
    Workload,
    run_sessions,
    stop,
    traced_latency,
    wait_http,
)

from services.nodes.wire import keypair  # noqa: E402
from supervisor.client import AdminClient, find_run_dirs  # noqa: E402

PORT = 8000
NODES_PORT = 7700
START_TIMEOUT_S = 60.0
TOPOLOGIES = ("one-box", "two-nodes")


class Hosts:
    """The namespaces, and the supervisors started on them."""

    def __init__(self, tmp: Path, delay_ms: float) -> None:
        self.tmp = tmp
        self.lab = netlab.Lab()
        for host in ("front", "n1", "n2"):
            self.lab.host(host)
        self.client_link = self.lab.link(None, "front", 0)
        netem = netlab.netem_missing() is None
        self.node_links = {
            "n1": self.lab.link("front", "n1", 1),
            "n2": self.lab.link("front", "n2", 2, delay_ms=delay_ms if netem else 0.0),
        }
        self.join = {n: f"{link.a_ip}:{NODES_PORT}" for n, link in self.node_links.items()}
        self.relay = None
        if delay_ms and not netem:
            link = self.node_links["n2"]
            self.relay = netlab.delay_relay(link.b, "127.0.0.1:7701", self.join["n2"], delay_ms)
            self.join["n2"] = "127.0.0.1:7701"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, host: str, ns: str, command: list[str], config: str) -> None:
        home = self.tmp / host
        home.mkdir(exist_ok=True)
        (home / "dreamwire.toml").write_text(config)
        env = {
            **os.environ,
            "DREAMWIRE_RUN_DIR": str(home / "run"),
            "DREAMWIRE_HOME": str(home),
            "DREAMWIRE_LOG_LEVEL": "WARNING",
        }
        log = open(home / "supervisor.log", "ab")  # noqa: SIM115 - the child holds it
        self.procs[host] = subprocess.Popen(
            [*self.lab.exec(ns), sys.executable, "-m", "supervisor.cli", *command,
             "--config", str(home / "dreamwire.toml")],
            cwd=ROOT, env=env, stdout=log, stderr=log,
        )  # fmt: skip
        log.close()

    def processes(self) -> dict[str, psutil.Process]:
        """Every supervisor and service process, named ``host:service``."""
        out: dict[str, psutil.Process] = {}
        for host, proc in self.procs.items():
            out[f"{host}:supervisor"] = psutil.Process(proc.pid)
            for run_dir in find_run_dirs(self.tmp / host / "run"):
                with AdminClient(run_dir) as admin:
                    for s in admin.status().services:
                        if s.pid:
                            out[f"{host}:{s.name}"] = psutil.Process(s.pid)
        return out

    def stop_all(self) -> None:
        for proc in self.procs.values():
            stop(proc)
        self.procs.clear()

    def close(self) -> None:
        self.stop_all()
        if self.relay is not None:
            self.relay.terminate()
            self.relay.wait(10)
        self.lab.close()


def front_config(hosts: Hosts, k: int, nodes: str) -> str:
    return (
        f'port = {PORT}\nhost = "{hosts.client_link.b_ip}"\nmax_sessions = {k}\n'
        "[api.ice]\nstun_urls = []\n" + nodes
    )


async def up(hosts: Hosts, topology: str, k: int) -> None:
    if topology == "one-box":
        config = 'pipelines = ["passthrough"]\n' + front_config(hosts, k, "")
        hosts.start("front", hosts.lab.ns("front"), ["start"], config)
    else:
        front_public, front_secret = keypair()
        keys = {n: keypair() for n in hosts.node_links}
        allowed = ", ".join(f'{n} = "{pub}"' for n, (pub, _) in keys.items())
        nodes = (
            f'[nodes]\nbind = "tcp://0.0.0.0:{NODES_PORT}"\nsecret_key = "{front_secret}"\n'
            f"allowed = {{ {allowed} }}\n"
        )
        hosts.start(
            "front",
            hosts.lab.ns("front"),
            ["start"],
            "media = false\n" + front_config(hosts, k, nodes),
        )
        for name, link in hosts.node_links.items():
            node = (
                f'pipelines = ["passthrough"]\n[node]\nname = "{name}"\n'
                f'secret_key = "{keys[name][1]}"\nfront_public_key = "{front_public}"\n'
            )
            hosts.start(name, link.b, ["node", "--join", f"tcp://{hosts.join[name]}"], node)
    base = f"http://{hosts.client_link.b_ip}:{PORT}"
    await wait_http(base + "/health", START_TIMEOUT_S)
    if topology == "two-nodes":  # both nodes joined: the pipeline is loaded on each
        run_dir = find_run_dirs(hosts.tmp / "front" / "run")[0]
        for _ in range(int(START_TIMEOUT_S * 5)):
            with AdminClient(run_dir) as admin:
                joined = [n for n in admin.status().nodes if n.up and n.pipelines]
            if len(joined) == 2:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("the nodes did not join")


async def measure(hosts: Hosts, topology: str, k: int, work: Workload) -> dict[str, Any]:
    base = f"http://{hosts.client_link.b_ip}:{PORT}"
    await up(hosts, topology, k)
    try:
        async with aiohttp.ClientSession() as http:

            async def get_json(path: str) -> Any:
                async with http.get(base + path) as resp:
                    return await resp.json()

            meter = CpuMeter({})
            mark = {"seq": 0}

            async def begin() -> None:
                meter.processes = hosts.processes()
                mark["seq"] = (await get_json("/api/v1/metrics"))["trace_seq"]
                meter.begin()

            async def end() -> dict[str, Any]:
                cpu = meter.end()
                return {**await traced_latency(http, base, mark["seq"]), "cpu_percent": cpu}

            run = await run_sessions(base, k, work, begin, end)
            run.pop("unreadable_sample", None)
            run["topology"] = topology
            return run
    finally:
        hosts.stop_all()


def table(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| topology | K | fps/session (min / mean) | p50 ms | p95 ms | to_node ms | from_node ms "
        "| server CPU % (all hosts) | CPU % per session |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        stages = r["stages_mean_ms"]
        lines.append(
            f"| {r['topology']} | {r['sessions']} | {r['fps_min']:.1f} / {r['fps_mean']:.1f} "
            f"| {r['latency_p50_ms']} | {r['latency_p95_ms']} | {stages.get('to_node', '–')} "
            f"| {stages.get('from_node', '–')} | {r['cpu_percent']['total']} "
            f"| {r['cpu_per_session']} |"
        )
    for r in runs:
        lines.append(f"\n{r['topology']} K={r['sessions']} stage means (ms): {r['stages_mean_ms']}")
        cpu = {k: v for k, v in r["cpu_percent"].items() if k != "total"}
        lines.append(f"  CPU % by process: {cpu}")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    ks = [int(k) for k in args.sessions.split(",")]
    work = Workload((512, 512), args.warmup, args.duration)
    tmp = Path(tempfile.mkdtemp(prefix="dwbn", dir="/tmp"))
    hosts = Hosts(tmp, args.delay_ms)
    try:
        runs = [await measure(hosts, t, k, work) for k in ks for t in TOPOLOGIES]
    except BaseException:
        print(f"bench_nodes: the hosts' logs are in {tmp}", file=sys.stderr)
        raise
    finally:
        hosts.close()
    shutil.rmtree(tmp, ignore_errors=True)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,2,4")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="added to n2's link")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if why := netlab.unavailable():
        print(f"bench_nodes: {why}", file=sys.stderr)
        return 2
    runs = asyncio.run(main_async(args))
    print(json.dumps(runs, indent=1) if args.json else table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
