"""Reads `strace -f -yy -e trace=connect,sendto,sendmsg,sendmmsg,write` output and fails if a
traced process reached an IP address other than loopback.

- A TCP connect() is a connection: its address must be loopback.
- A UDP connect() sends nothing; it only picks a route. Chromium does this to 2001:4860:4860::8888
  to learn whether IPv6 works. Such calls are counted and reported, not failed.
- Any send or write on an inet socket is traffic: the destination in its arguments, or the peer
  that `-yy` shows for a connected socket, must be loopback. This also catches DNS queries.
- A trace without a single connection or send to an IP address fails: it traced nothing.

  python tools/only_loopback.py TRACE...
"""
import re
import sys

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
CALL = re.compile(r"^\s*\d+\s+(connect|sendto|sendmsg|sendmmsg|write)\(\d+<(TCP|TCPv6|UDP|UDPv6):\[(.*?)\]>(.*)")
EXPLICIT = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')
PEER = re.compile(r"->\[?([0-9a-fA-F.:]+?)\]?:\d+$")


def main(paths):
    checked, route_probes, outside, silent = 0, {}, {}, []
    for path in paths:
        checked_before = checked
        with open(path, errors="replace") as f:
            for line in f:
                m = CALL.match(line)
                if not m:
                    continue
                call, proto, endpoints, args = m.groups()
                addresses = [a or b for a, b in EXPLICIT.findall(args)]
                peer = PEER.search(endpoints)
                if peer:
                    addresses.append(peer.group(1))
                if call == "connect" and proto.startswith("UDP"):
                    for a in addresses:
                        if a not in LOOPBACK:
                            route_probes[a] = route_probes.get(a, 0) + 1
                    continue
                for a in addresses:
                    checked += 1
                    if a not in LOOPBACK:
                        outside[f"{call} {proto} {a}"] = outside.get(f"{call} {proto} {a}", 0) + 1
        if checked == checked_before:
            silent.append(path)
    if outside:
        sys.exit(f"traffic outside loopback: {outside} (traces: {' '.join(paths)})")
    # Superset talks to PostgreSQL and the browser to Superset, both over TCP: a trace without
    # a single connection traced nothing (wrong pid, strace not attached), so it proves nothing.
    if silent:
        sys.exit(f"no connection or send to an IP address in {' '.join(silent)}: the trace saw no traffic, so it checks nothing")
    probes = f"; UDP route probes without traffic: {route_probes}" if route_probes else ""
    print(f"loopback only: {checked} connections and sends to IP addresses, all to loopback{probes}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(sys.argv[1:])
