"""What the node's memory holds, from /proc: how much is available, and how much a process
holds counting shared pages once (PSS). Linux only; 0 or an OSError elsewhere."""

from __future__ import annotations


def memory_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_bytes(pid: int | str = "self", path: str | None = None) -> int:
    """Proportional set size of a process (smaps_rollup), or of its mappings of `path` (smaps):
    each shared page counts 1/N in each of the N processes mapping it, so the PSS of N
    processes adds up to what they hold together (RSS would count shared pages N times)."""
    if path is None:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
    total, inside = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                inside = len(head) >= 6 and head[5] == path
            elif inside and head[0] == "Pss:":
                total += int(head[1]) * 1024
    return total
