"""Hosts on one machine: Linux network namespaces joined by veth pairs (``ip netns``, ``tc``).

The media-node tests and ``bench_nodes.py`` run a front and its nodes as separate hosts with
real TCP between them, a delay on a link where asked (``tc netem``), and links that can be cut.
Needs root (or CAP_NET_ADMIN) and iproute2; :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"dwprobe{uuid.uuid4().hex[:6]}"
    try:
        _ip("netns", "add", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        err = getattr(exc, "stderr", b"") or b""
        return f"cannot make network namespaces ({err.decode().strip() or exc})"
    _ip("netns", "del", probe)
    return None


def netem_missing() -> str | None:
    """Why ``tc netem`` cannot delay a link here (None: it can). Some kernels are built
    without ``sch_netem``; :func:`delay_relay` is then the delay instead."""
    if shutil.which("tc") is None:
        return "iproute2's `tc` is not installed"
    probe = f"dwprobe{uuid.uuid4().hex[:6]}"
    _ip("netns", "add", probe)
    try:
        _ip("-n", probe, "link", "set", "lo", "up")
        done = subprocess.run(
            ["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
             "delay", "1ms"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        return None if done.returncode == 0 else f"tc netem: {done.stderr.strip()}"
    finally:
        _ip("netns", "del", probe)


@dataclass
class Link:
    """A veth pair: ``a_dev`` in ``a`` (``a_ip``) and ``b_dev`` in ``b`` (``b_ip``); a host of
    None is the machine's own namespace."""

    a: str | None
    b: str
    a_dev: str
    b_dev: str
    a_ip: str
    b_ip: str


@dataclass
class Lab:
    """Namespaces named ``<tag>-<host>`` and the links between them; :meth:`close` deletes
    them all (their veths go with them)."""

    tag: str = field(default_factory=lambda: f"dw{os.getpid() % 100000}")
    hosts: list[str] = field(default_factory=list)
    links: list[Link] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def host(self, host: str) -> str:
        ns = self.ns(host)
        _ip("netns", "add", ns)
        self.hosts.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def link(self, a: str | None, b: str, subnet: int, delay_ms: float = 0.0) -> Link:
        """Join host ``a`` (None: this machine's namespace) to ``b`` on 10.213.<subnet>.0/24:
        ``a`` is .1, ``b`` .2; ``delay_ms`` is added each way (netem)."""
        n = len(self.links)
        link = Link(
            a=None if a is None else self.ns(a),
            b=self.ns(b),
            a_dev=f"{self.tag}a{n}"[-15:],
            b_dev=f"{self.tag}b{n}"[-15:],
            a_ip=f"10.213.{subnet}.1",
            b_ip=f"10.213.{subnet}.2",
        )
        _ip("link", "add", link.a_dev, "type", "veth", "peer", "name", link.b_dev)
        _ip("link", "set", link.b_dev, "netns", link.b)
        if link.a is not None:
            _ip("link", "set", link.a_dev, "netns", link.a)
        for ns, dev, addr in ((link.a, link.a_dev, link.a_ip), (link.b, link.b_dev, link.b_ip)):
            prefix = ["-n", ns] if ns else []
            _ip(*prefix, "addr", "add", f"{addr}/24", "dev", dev)
            _ip(*prefix, "link", "set", dev, "up")
            if delay_ms:  # needs netem (netem_missing() is None)
                subprocess.run(
                    [*self.exec(ns), "tc", "qdisc", "add", "dev", dev, "root", "netem",
                     "delay", f"{delay_ms}ms"],
                    check=True, capture_output=True, timeout=10,
                )  # fmt: skip
        self.links.append(link)
        return link

    def exec(self, ns: str | None) -> list[str]:
        """The command prefix that runs a program on host ``ns``."""
        return ["ip", "netns", "exec", ns] if ns else []

    def set_link(self, link: Link, up: bool) -> None:
        """Cut (or restore) a link, as a pulled cable would: the node's side goes down."""
        _ip("-n", link.b, "link", "set", link.b_dev, "up" if up else "down")

    def close(self) -> None:
        for ns in reversed(self.hosts):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        for link in self.links:
            if link.a is None:  # the root end goes with its peer; make sure
                subprocess.run(["ip", "link", "del", link.a_dev], capture_output=True, timeout=10)
        self.hosts.clear()
        self.links.clear()


# ---------------------------------------------------------------- a delay without netem


def delay_relay(
    ns: str | None, listen: str, target: str, delay_ms: float
) -> subprocess.Popen[bytes]:
    """A TCP relay on host ``ns`` that holds every byte ``delay_ms`` each way before passing
    it on (order kept): a link's latency where the kernel has no netem. Stops with SIGTERM."""
    here = os.path.abspath(__file__)
    args = ["delay", "--listen", listen, "--to", target, "--ms", str(delay_ms)]
    cmd = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.Popen([*cmd, sys.executable, here, *args])


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def release() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writer.write(chunk)
            await writer.drain()
        writer.close()

    releasing = asyncio.create_task(release())
    try:
        while chunk := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay_s, chunk))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, b""))
    await releasing


async def _relay(listen: str, target: str, delay_s: float) -> None:
    lhost, lport = listen.rsplit(":", 1)
    thost, tport = target.rsplit(":", 1)

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(thost, int(tport))
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _pipe(reader, up_writer, delay_s), _pipe(up_reader, writer, delay_s),
            return_exceptions=True,
        )  # fmt: skip

    server = await asyncio.start_server(on_client, lhost, int(lport))
    async with server:
        await server.serve_forever()


def main() -> int:
    parser = argparse.ArgumentParser(description="netlab helpers")
    sub = parser.add_subparsers(dest="command", required=True)
    relay = sub.add_parser("delay", help="a TCP relay that delays both ways")
    relay.add_argument("--listen", required=True, help="host:port")
    relay.add_argument("--to", required=True, help="host:port")
    relay.add_argument("--ms", type=float, required=True)
    args = parser.parse_args()
    asyncio.run(_relay(args.listen, args.to, args.ms / 1000))
    return 0


if __name__ == "__main__":
    sys.exit(main())
