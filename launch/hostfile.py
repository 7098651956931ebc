"""Hostfiles in DeepSpeed's format (`host slots=N`), validated, with include/exclude filters.

Every host name and value that later reaches a command line is checked here first: a name may only
hold the characters of a DNS name or an IP address, so it can never carry shell syntax.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

# A DNS name (labels of letters, digits, '-', '_', joined by dots) or an IPv4/IPv6 address; nothing else.
_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?")
_LINE = re.compile(r"(?P<host>\S+)\s+slots\s*=\s*(?P<slots>\S+)\s*")


class HostfileError(ValueError):
    """A hostfile (or --include/--exclude) that cannot be used, with where and how to fix it."""


@dataclass(frozen=True)
class Host:
    """One node of the job: its name (as the other nodes reach it) and how many processes it runs."""

    name: str
    slots: int


def check_host(name: str) -> str:
    """Return `name` if it is a plain DNS name or IP address, else raise HostfileError naming it."""
    try:
        ipaddress.ip_address(name)
        return name
    except ValueError:
        pass
    if len(name) > 253 or not _NAME.fullmatch(name):
        raise HostfileError(
            f"host {name!r} is not a valid host name or IP address (letters, digits, '.', '-', '_' only)"
        )
    return name


def parse_hosts(text: str, source: str = "hostfile") -> list[Host]:
    """Parse hostfile text: one `host slots=N` per line, `#` comments and blank lines ignored."""
    hosts: dict[str, Host] = {}
    for num, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {num} ({raw.strip()!r})"
        m = _LINE.fullmatch(line)
        if not m:
            raise HostfileError(f"{where}: expected 'HOST slots=N', e.g. 'worker-1 slots=8'")
        try:
            host = check_host(m["host"])
        except HostfileError as e:
            raise HostfileError(f"{where}: {e}") from None
        if not m["slots"].isdigit() or int(m["slots"]) < 1:
            raise HostfileError(f"{where}: slots must be a positive integer, got {m['slots']!r}")
        if host in hosts:
            raise HostfileError(f"{where}: host {host!r} is listed twice; give it one line with its total slots")
        hosts[host] = Host(host, int(m["slots"]))
    if not hosts:
        raise HostfileError(f"{source} lists no hosts; write one 'HOST slots=N' line per node")
    return list(hosts.values())


def _names(spec: str, known: list[str], flag: str) -> set[str]:
    """Host names of an --include/--exclude value (`a,b` or DeepSpeed's `a@b`), each one known."""
    names = {n.strip() for n in re.split(r"[,@]", spec) if n.strip()}
    for n in names:
        if ":" in n:
            raise HostfileError(f"{flag} {n!r}: selects whole hosts only (no ':slot' lists); edit the slots instead")
        if n not in known:
            raise HostfileError(f"{flag} names host {n!r}, which is not in the hostfile (hosts: {', '.join(known)})")
    return names


def select_hosts(hosts: list[Host], include: str = "", exclude: str = "") -> list[Host]:
    """Keep the hosts named by `include` (all if empty), drop those named by `exclude`; order is kept."""
    known = [h.name for h in hosts]
    keep = _names(include, known, "--include") if include else set(known)
    drop = _names(exclude, known, "--exclude") if exclude else set()
    chosen = [h for h in hosts if h.name in keep and h.name not in drop]
    if not chosen:
        raise HostfileError("--include/--exclude leave no host to run on")
    return chosen


def read_hostfile(path: str | os.PathLike, include: str = "", exclude: str = "") -> list[Host]:
    """Read, validate and filter a hostfile."""
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "not found"
        raise HostfileError(f"hostfile {str(p)!r} {what}; write one 'HOST slots=N' line per node")
    return select_hosts(parse_hosts(p.read_text(), source=str(p)), include, exclude)


def format_hosts(hosts: list[Host]) -> str:
    """The hostfile text for `hosts` (what DeepSpeed's launcher reads)."""
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


def is_local(host: str) -> bool:
    """True if `host` is this machine: its address can be bound here."""
    try:
        addr = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)[0][4][0]
    except OSError:
        return False
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with socket.socket(fam) as s:
        try:
            s.bind((addr, 0))
            return True
        except OSError:
            return False
