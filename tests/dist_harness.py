"""Run a function on N CPU ranks (gloo) in spawned processes, with a deadline and cleanup.

Ranks meet through a FileStore in a temporary directory (``init_method="file://..."``), not a TCP port:
no free-port race between concurrent test runs. Each rank writes its traceback to a file on failure, so
the parent raises with the rank's own error; ranks still alive at the deadline are killed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
import traceback

#: Wall-clock limit of one spawned group (startup of each process included: ~5-10 s on 2 busy cores).
DEFAULT_TIMEOUT_S = 240


def _entry(fn, rank: int, world_size: int, store: str, errdir: str, args: tuple) -> None:
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)  # N ranks share the machine's cores
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
        try:
            fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(errdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise SystemExit(1)


def spawn(fn, world_size: int, *args, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; raise if any fails or time runs out.
    ``fn`` must be importable by module name (a module-level function of a test module)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="kbit-dist-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_entry, args=(fn, r, world_size, store, tmp, args), daemon=True)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        try:
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
        finally:
            hung = [p for p in procs if p.is_alive()]
            for p in hung:
                p.kill()
            for p in procs:
                p.join(5)
        errors = []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.err")
            if os.path.exists(path):
                with open(path) as f:
                    errors.append(f"rank {r}:\n{f.read()}")
        if hung:
            raise TimeoutError(f"{len(hung)} of {world_size} ranks still running after {timeout} s (killed)\n"
                               + "\n".join(errors))
        if errors or any(p.exitcode != 0 for p in procs):
            raise RuntimeError("distributed run failed: exit codes "
                               f"{[p.exitcode for p in procs]}\n" + "\n".join(errors))
