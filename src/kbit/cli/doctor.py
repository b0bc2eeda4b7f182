"""Versions, the CPU kernel level in use, threads, and a self-check: every native op against the
pure-PyTorch reference at every CPU level this machine supports. Exit status 1 on any mismatch."""

from __future__ import annotations

import argparse
import platform
import time

HELP = "versions, CPU kernel level, threads, and a self-check of every op (the default)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run(args: argparse.Namespace) -> int:
    import torch

    import kbit
    from kbit.selfcheck import run_selfcheck

    print(f"kbit {kbit.__version__}  (torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()})")
    print(f"CPU kernel level : {kbit.get_cpu_capability()}  (supported: {', '.join(kbit.supported_cpu_capabilities())})")
    print(f"threads          : {torch.get_num_threads()}  (torch.set_num_threads / OMP_NUM_THREADS)")
    try:
        import bitsandbytes

        print(f"bitsandbytes     : {bitsandbytes.__version__} (interop available)")
    except Exception:  # noqa: BLE001 - optional; any failure means "not available"
        print("bitsandbytes     : not installed (not needed)")
    for module, extra, feature in [("tqdm", "progress", "progress bars"), ("matplotlib", "plot", "demo plots"),
                                   ("safetensors", "safetensors", "`quantize`")]:
        try:
            version = __import__(module).__version__
            print(f"{module:17}: {version}")
        except Exception:  # noqa: BLE001 - optional
            print(f"{module:17}: not installed ({feature}: pip install 'kbit[{extra}]')")
    t0 = time.perf_counter()
    results = run_selfcheck()
    failures = [r for r in results if not r.ok]
    print(f"self-check       : {len(results) - len(failures)}/{len(results)} native-vs-reference checks identical "
          f"({time.perf_counter() - t0:.2f} s)")
    for r in failures:
        print(f"  MISMATCH [{r.level}] {r.op}: {r.case} {r.detail}")
    if failures:
        print("kbit's native kernels disagree with the reference on this machine. Please report this with the output "
              "above; meanwhile KBIT_CPU_CAPABILITY=scalar selects the reference-twin kernels.")
        return 1
    print("OK")
    return 0
