"""The client address a rate limit is keyed on, behind trusted reverse proxies.

Behind nginx or a load balancer every request comes from the proxy, so limits "per IP" would
put all viewers in one bucket. When the peer is a configured trusted proxy, the client is the
right-most address of ``X-Forwarded-For`` that is not itself a trusted proxy (the left-most
entries are whatever the client chose to send, so they are never believed). With no trusted
proxies, or a peer that is not one, the header is ignored: anyone can send it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``["10.0.0.0/8", "127.0.0.1"]`` -> networks; ``ValueError`` naming a bad entry."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            what = f"{entry!r} is not an IP address or network"
            raise ValueError(f"trusted_proxies: {what}") from None
    return tuple(networks)


def _trusted(address: str, proxies: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in proxies)


def client_ip(peer: str | None, forwarded_for: str | None, proxies: tuple[Network, ...]) -> str:
    """The client's address for a request from ``peer`` carrying ``X-Forwarded-For``."""
    if peer is None:
        return "unknown"
    if not proxies or not forwarded_for or not _trusted(peer, proxies):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a garbled hop: the last address we can vouch for is the proxy
    return hops[0] if hops else peer
