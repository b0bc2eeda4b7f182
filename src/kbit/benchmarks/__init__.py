"""kbit's benchmarks, importable so that ``python -m kbit bench`` works from an installed package.

Each module measures against a baseline taken in the same run (ratios, not absolute times: the
machine is shared and noisy) and has a ``main(argv)`` that prints a markdown table. The scripts in the
repository's ``benchmarks/`` folder (the commands BENCHMARKS.md cites) are thin wrappers around them.

    quantize     quantize/dequantize kernels vs copy_/clone of the same tensor
    optim        optimizer step time vs torch.optim.AdamW(fused=True), state bytes per parameter
    linear4bit   Linear4bit forward vs a dense nn.Linear
"""

NAMES = ("quantize", "optim", "linear4bit")
