"""CPU steal time: the share of the time this virtual machine's CPUs were ready to run but the
hypervisor ran something else (Linux /proc/stat). On shared cloud machines it comes in bursts and
slows every pass by that share; the benchmarks print it beside their figures so that a run made
in a noisy minute can be told from one made in a quiet one."""
from __future__ import annotations

from typing import List, Optional


def _cpu_jiffies() -> Optional[List[int]]:
    try:
        with open('/proc/stat') as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != 'cpu' or len(fields) < 9:
        return None
    return [int(v) for v in fields[1:]]


class CpuSteal:
    """``with CpuSteal() as s: ...`` then ``s.percent``: steal time over the block, in percent of
    all CPU time of the machine (None where /proc/stat is not available)."""

    def __enter__(self):
        self.start = _cpu_jiffies()
        self.percent: Optional[float] = None
        return self

    def __exit__(self, *exc) -> None:
        end = _cpu_jiffies()
        if self.start is None or end is None:
            return
        delta = [b - a for a, b in zip(self.start, end)]
        total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
        if total > 0:
            self.percent = 100.0 * delta[7] / total
