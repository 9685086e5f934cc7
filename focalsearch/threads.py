"""CPU threads for the model, chosen so that a machine shared with other work stays usable.

By default an OpenMP worker that runs out of work spins on its core for a while before it sleeps.
On a quiet machine that saves a wake-up; on a busy one the spinning threads take the cores from
the very processes they wait for: indexing the examples under two instructions fell from about
230 to 10 images/s beside two busy processes on 2 cores (benchmarks/throughput.py --contention
measures it). So unless the user chose a policy, idle workers sleep. OpenMP reads this once, when
torch loads it, so it must be set before torch is imported.
"""

from __future__ import annotations

import os
import sys

_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def prepare_environment() -> None:
    """Make idle OpenMP threads sleep rather than spin, unless the user set a policy."""
    if not any(name in os.environ for name in _WAIT_VARIABLES):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads (default: OMP_NUM_THREADS where set, as torchrun does for its
    processes, else available_cores()); returns the number set."""
    if "torch" not in sys.modules:
        prepare_environment()
    import torch

    from_env = os.environ.get("OMP_NUM_THREADS", "")
    count = threads or (int(from_env) if from_env.isdigit() and int(from_env) > 0 else available_cores())
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count
