"""``python -m kbit``: diagnostics and a demo.

    python -m kbit            # same as `doctor`
    python -m kbit doctor     # versions, CPU kernel level, threads, self-check of every op (exit 1 on mismatch)
    python -m kbit demo       # NF4/FP4/8-bit quantization, 8-bit vs 32-bit AdamW training, a 4-bit layer
"""

from __future__ import annotations

import argparse
import platform
import sys
import time


def _doctor(args: argparse.Namespace) -> int:
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


def _demo(args: argparse.Namespace) -> int:
    import torch

    import kbit
    import kbit.functional as F

    torch.manual_seed(0)
    n = args.size
    print(f"kbit demo: a {n}x{n} float32 weight matrix (CPU level {kbit.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads)\n")
    w = torch.randn(n, n) * 0.02
    x = torch.randn(16, n)
    ref = x @ w.t()

    def timed(fn, repeats=5):
        """Result of fn() and its median time in ms (the first call warms up)."""
        out = fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        return out, sorted(samples)[len(samples) // 2]

    rows = []
    for label, quant, dequant in [
        ("NF4 (bs 64, double quant)",
         lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"), F.dequantize_4bit),
        ("FP4 (bs 64, double quant)",
         lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="fp4"), F.dequantize_4bit),
        ("8-bit dynamic (bs 256)", lambda: F.quantize_blockwise(w, blocksize=256), F.dequantize_blockwise),
    ]:
        (q, state), q_ms = timed(quant)
        w_hat, dq_ms = timed(lambda: dequant(q, state))
        stats = [state.absmax] + ([state.state2.absmax] if state.nested else [])
        nbytes = q.numel() * q.element_size() + sum(t.numel() * t.element_size() for t in stats)
        weight_err = ((w_hat - w).norm() / w.norm()).item()
        out_err = ((x @ w_hat.t() - ref).norm() / ref.norm()).item()
        rows.append((label, 8 * nbytes / w.numel(), weight_err, out_err, q_ms, dq_ms))

    print(f"{'format':28} {'bits/param':>10} {'weight rel.err':>15} {'output rel.err':>15} {'quantize ms':>12} {'dequant ms':>11}")
    print(f"{'float32':28} {32.0:10.2f} {0.0:15.4f} {0.0:15.4f} {'-':>12} {'-':>11}")
    for label, bits, werr, oerr, qms, dqms in rows:
        print(f"{label:28} {bits:10.2f} {werr:15.4f} {oerr:15.4f} {qms:12.2f} {dqms:11.2f}")
    print("\nNF4 stores a weight in ~4.1 bits with ~10% relative error; the 8-bit dynamic map in ~8.1 bits with ~1%.")
    _demo_optimizers(args.steps)
    _demo_linear4bit(n, timed)
    print("\nRun `python -m kbit doctor` to check the kernels on this machine.")
    return 0


def _demo_optimizers(steps: int) -> None:
    """The same small regression model trained with torch's AdamW and kbit's 32-bit and 8-bit AdamW."""
    import torch

    import kbit

    print(f"\nTraining a 2-layer MLP for {steps} steps on a noisy regression (AdamW, lr 1e-3):")
    print(f"{'optimizer':26} {'final loss':>11} {'state bytes/param':>18} {'step ms':>8}")
    for name, make in [("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3)),
                       ("kbit.optim.AdamW (32-bit)", lambda ps: kbit.optim.AdamW(ps, lr=1e-3)),
                       ("kbit.optim.AdamW8bit", lambda ps: kbit.optim.AdamW8bit(ps, lr=1e-3))]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
        x = torch.randn(512, 256)
        y = torch.tanh(x @ torch.randn(256, 256) / 8) + 0.1 * torch.randn(512, 256)  # loss floor ~0.01
        opt = make(list(model.parameters()))
        t0 = time.perf_counter()
        for _ in range(steps):
            loss = (model(x) - y).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        ms = (time.perf_counter() - t0) / steps * 1e3
        nparams = sum(p.numel() for p in model.parameters())
        state = sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
                    if isinstance(v, torch.Tensor) and k not in ("qmap1", "qmap2"))
        print(f"{name:26} {loss.item():11.4g} {state / nparams:18.2f} {ms:8.2f}")


def _demo_linear4bit(n: int, timed) -> None:
    """A dense layer against its NF4 version, batch 1, in inference."""
    import torch

    import kbit

    torch.manual_seed(0)
    dense = torch.nn.Linear(n, n, dtype=torch.bfloat16).eval()
    q = kbit.nn.LinearNF4(n, n, compute_dtype=torch.bfloat16)
    q.load_state_dict(dense.state_dict())
    q = q.to("cpu").eval()
    x = torch.randn(1, n, dtype=torch.bfloat16)
    with torch.inference_mode():
        _, t_dense = timed(lambda: dense(x), repeats=20)
        _, t_q = timed(lambda: q(x), repeats=20)
    print(f"\nLinear {n}x{n} bf16, batch 1: dense {t_dense:.3f} ms, NF4 {t_q:.3f} ms ({t_dense / t_q:.2f}x), "
          f"weights {2 * n * n / 2**20:.1f} MiB -> {q.weight.numel() * q.weight.element_size() / 2**20:.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kbit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    p_doctor = sub.add_parser("doctor", help="versions, CPU kernel level, threads, and a self-check of every op")
    p_doctor.set_defaults(func=_doctor)
    p_demo = sub.add_parser("demo", help="quantization error/size/speed, 8-bit vs 32-bit optimizers, a 4-bit layer")
    p_demo.add_argument("--size", type=int, default=2048, help="the matrix is size x size (default 2048)")
    p_demo.add_argument("--steps", type=int, default=200, help="training steps of the optimizer comparison (default 200)")
    p_demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    if args.command is None:
        args.func = _doctor
    if getattr(args, "size", 1) <= 0 or getattr(args, "steps", 1) <= 0:
        parser.error("--size and --steps must be positive integers")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
