"""Convert a safetensors checkpoint to 4-bit (NF4 or FP4) in bitsandbytes' serialized layout.

IN is a ``.safetensors`` file or a folder of ``*.safetensors`` shards (with or without a
``model.safetensors.index.json``); OUT is a file or a folder to match. Each quantized weight ``W``
becomes the entries a ``Linear4bit.state_dict()`` holds: ``W`` (packed codes), ``W.absmax``,
``W.quant_map``, with double quantization ``W.nested_absmax`` and ``W.nested_quant_map``, and
``W.quant_state.bitsandbytes__nf4`` (or ``__fp4``). ``kbit.nn.Linear4bit.load_state_dict`` and
bitsandbytes' ``Params4bit.from_prequantized`` read them directly.

Which tensors are quantized (everything else is copied unchanged):
  a floating-point, non-empty 2-D tensor whose name ends in "weight" and matches none of the skip patterns.
  The default skip patterns keep embeddings and the output head in float (they are lookups or
  precision-critical, and transformers never quantizes them either): {default_skip}.
  --skip adds a pattern (shell-style, matched against the whole tensor name); --no-default-skip
  drops the defaults. Biases, norms and other non-2-D tensors are always kept.

A folder's other top-level files (config.json, tokenizer files...) are copied; a config.json gets a
``quantization_config`` in the schema transformers uses for bitsandbytes 4-bit checkpoints.

Memory stays near one tensor: tensors are read one at a time (safetensors ``safe_open``) and their
bytes streamed to temporary files in OUT's folder, which become OUT by one ``os.replace`` at the end
(after fsync). An interrupted or failed run leaves neither OUT nor temporary files behind.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ._progress import progress

HELP = "convert a safetensors checkpoint (file or folder) to NF4/FP4 in bitsandbytes' 4-bit format"

DEFAULT_SKIP = ("*embed*", "*lm_head*", "*wte.*", "*wpe.*")
INDEX_NAME = "model.safetensors.index.json"
_STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")
_COMPUTE_DTYPES = ("float32", "float16", "bfloat16")

__doc__ = __doc__.format(default_skip=", ".join(DEFAULT_SKIP))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="IN", help="a .safetensors file or a folder of *.safetensors shards")
    parser.add_argument("output", metavar="OUT", help="where to write the 4-bit file (or folder, for a folder IN)")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit data type (default nf4)")
    parser.add_argument("--blocksize", type=int, default=64,
                        help="weights per absmax scale: 32, 64, 128, ..., 4096 (default 64)")
    parser.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                        help="keep the block scales in float32 (default: quantize them to 8 bits, ~0.37 bit/weight saved)")
    parser.add_argument("--quant-storage", choices=_STORAGE_DTYPES, default="uint8",
                        help="dtype the packed bytes are stored as (default uint8; bf16/fp16/fp32 for FSDP)")
    parser.add_argument("--compute-dtype", choices=_COMPUTE_DTYPES, default=None,
                        help="recorded as bnb_4bit_compute_dtype in a folder's config.json and in the file metadata "
                             "(the data itself does not depend on it; default: not recorded)")
    parser.add_argument("--skip", action="append", default=[], metavar="PATTERN",
                        help="keep tensors whose name matches this shell-style pattern in float (repeatable; "
                             f"added to the defaults {', '.join(DEFAULT_SKIP)})")
    parser.add_argument("--no-default-skip", action="store_true",
                        help="quantize embeddings and lm_head too (only --skip patterns are kept)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def validate(args: argparse.Namespace) -> Optional[str]:
    from kbit.formats import BLOCKSIZES_4BIT

    if args.blocksize not in BLOCKSIZES_4BIT:
        return f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES_4BIT))} (got {args.blocksize})"
    src, dst = Path(args.input), Path(args.output)
    if not src.exists():
        return f"IN {src} does not exist"
    if src.is_dir() and not sorted(src.glob("*.safetensors")):
        return f"IN folder {src} holds no *.safetensors files"
    if dst.exists() and not args.force:
        return f"OUT {dst} exists; pass --force to replace it"
    if src.is_file() and dst.is_dir():
        return f"IN is a file but OUT {dst} is a folder; name the output file"
    if dst.resolve() == src.resolve():
        return "OUT must differ from IN"
    return None


# ---- what to quantize ---------------------------------------------------------------------------------
@dataclass
class Options:
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    quant_storage: str = "uint8"
    compute_dtype: Optional[str] = None
    skip: tuple = DEFAULT_SKIP


def should_quantize(name: str, shape, is_float: bool, skip) -> bool:
    """The rule in the module docstring (an empty tensor has nothing to quantize and is kept)."""
    return (is_float and len(shape) == 2 and shape[0] * shape[1] > 0 and name.endswith("weight")
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip))


def _quantize_tensor(tensor, opts: Options) -> dict:
    """``{suffix: tensor}`` for one weight: ``""`` is the packed data, the rest its ``.absmax`` etc."""
    import torch

    import kbit.functional as F

    packed, state = F.quantize_4bit(tensor, blocksize=opts.blocksize, compress_statistics=opts.double_quant,
                                    quant_type=opts.quant_type, quant_storage=getattr(torch, opts.quant_storage))
    out = {"": packed}
    # clone(): the code map may be one tensor shared by every state; each entry must own its bytes.
    out.update({"." + k: v.clone() for k, v in state.as_dict(packed=True).items()})
    return out


# ---- streaming safetensors writer ---------------------------------------------------------------------
_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL", "uint16": "U16", "uint32": "U32", "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


class StreamingSafetensorsWriter:
    """Writes a safetensors file without holding its tensors: each tensor's bytes go to a spool file
    as it arrives; :meth:`commit` writes the header and the spooled bytes to a temporary file, fsyncs
    it and renames it to ``path``. :meth:`abort` (or an exception inside ``with``) removes every
    temporary file.

    Note [alignment without reordering]: safetensors' loaders view each tensor in place, so its
    offset must be a multiple of its element size, and the format forbids gaps between tensors.
    Tensors are spooled into one file per element size and the spools are concatenated from the
    largest element size down: the header is padded to 8 bytes and every spool's length is a
    multiple of its element size, so every offset lands aligned without buffering or padding.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.dir = self.path.parent
        self.entries: dict[str, tuple[str, list, int, int]] = {}  # name -> (dtype, shape, itemsize, spool offset)
        self.spools: dict[int, tuple[str, object]] = {}
        self.tensor_bytes = 0
        self._tmp_out: Optional[str] = None

    def _spool(self, itemsize: int):
        if itemsize not in self.spools:
            fd, name = tempfile.mkstemp(dir=self.dir, prefix=f".{self.path.name}.spool{itemsize}.", suffix=".tmp")
            self.spools[itemsize] = (name, os.fdopen(fd, "w+b"))
        return self.spools[itemsize][1]

    def add(self, name: str, tensor) -> None:
        import torch

        if name in self.entries:
            raise ValueError(f"duplicate tensor name {name!r}")
        dtype_name = str(tensor.dtype).replace("torch.", "")
        if dtype_name not in _ST_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be stored in safetensors")
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        raw = t.view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        f = self._spool(tensor.element_size())
        offset = f.tell()
        f.write(raw.numpy().tobytes() if raw.numel() < (1 << 20) else memoryview(raw.numpy()))
        self.entries[name] = (_ST_DTYPES[dtype_name], list(tensor.shape), tensor.element_size(), offset)
        self.tensor_bytes += raw.numel()

    def commit(self, metadata: Optional[dict] = None) -> None:
        order = sorted(self.spools, reverse=True)
        base, starts = 0, {}
        for itemsize in order:
            starts[itemsize] = base
            base += self.spools[itemsize][1].tell()
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for name, (dtype, shape, itemsize, offset) in self.entries.items():
            size = 1
            for s in shape:
                size *= s
            start = starts[itemsize] + offset
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, start + size * itemsize]}
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)
        fd, self._tmp_out = tempfile.mkstemp(dir=self.dir, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for itemsize in order:
                spool = self.spools[itemsize][1]
                spool.seek(0)
                shutil.copyfileobj(spool, out, length=16 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(self._tmp_out, 0o666 & ~_umask())  # mkstemp makes 0600; the result is an ordinary file
        os.replace(self._tmp_out, self.path)
        self._tmp_out = None
        _fsync_dir(self.dir)
        self._close_spools()

    def _close_spools(self) -> None:
        for name, f in self.spools.values():
            f.close()
            _remove(name)
        self.spools.clear()

    def abort(self) -> None:
        self._close_spools()
        if self._tmp_out is not None:
            _remove(self._tmp_out)
            self._tmp_out = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- conversion ---------------------------------------------------------------------------------------
@dataclass
class Summary:
    quantized: int = 0
    kept: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    skipped_weights: list = field(default_factory=list)  # 2-D float weights kept by a skip pattern


def _check_not_quantized(names) -> None:
    for name in names:
        if ".quant_state.bitsandbytes__" in name:
            raise ValueError(f"IN is already 4-bit quantized (it holds {name!r})")


def convert_file(src: Path, dst: Path, opts: Options, summary: Summary, bar) -> dict:
    """Quantize one safetensors file into ``dst`` (atomically); returns ``{output name: nbytes}``."""
    from safetensors import safe_open

    written = {}
    with safe_open(str(src), framework="pt") as f, StreamingSafetensorsWriter(dst) as writer:
        names = list(f.keys())
        _check_not_quantized(names)
        for name in names:
            tensor = f.get_tensor(name)
            summary.bytes_before += tensor.numel() * tensor.element_size()
            if should_quantize(name, tensor.shape, tensor.is_floating_point(), opts.skip):
                for suffix, t in _quantize_tensor(tensor, opts).items():
                    writer.add(name + suffix, t)
                    written[name + suffix] = t.numel() * t.element_size()
                summary.quantized += 1
            else:
                if should_quantize(name, tensor.shape, tensor.is_floating_point(), ()):  # kept by a pattern
                    summary.skipped_weights.append(name)
                writer.add(name, tensor)
                written[name] = tensor.numel() * tensor.element_size()
                summary.kept += 1
            del tensor
            bar.update(1)
        metadata = dict(f.metadata() or {})
        metadata.setdefault("format", "pt")
        metadata.update({"kbit.quant_type": opts.quant_type, "kbit.blocksize": opts.blocksize,
                         "kbit.double_quant": opts.double_quant, "kbit.quant_storage": opts.quant_storage})
        if opts.compute_dtype:
            metadata["kbit.compute_dtype"] = opts.compute_dtype
        writer.commit(metadata)
    summary.bytes_after += sum(written.values())
    return written


def _count_tensors(files) -> int:
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            total += len(list(f.keys()))
    return total


def _shards(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{index} names shards that are missing: {missing}")
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def _quantization_config(opts: Options, summary: Summary) -> dict:
    """transformers' serialized BitsAndBytesConfig for a 4-bit checkpoint with these options."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": opts.quant_type,
        "bnb_4bit_use_double_quant": opts.double_quant,
        "bnb_4bit_compute_dtype": opts.compute_dtype or "float32",
        "bnb_4bit_quant_storage": opts.quant_storage,
        "llm_int8_skip_modules": sorted({n.rsplit(".", 1)[0] for n in summary.skipped_weights}) or None,
    }


def convert_folder(src: Path, tmp_dir: Path, opts: Options, summary: Summary, show_progress: bool) -> None:
    shards = _shards(src)
    bar = progress(total=_count_tensors(shards), desc="quantize", unit="tensor", enabled=show_progress)
    weight_map = {}
    try:
        for shard in shards:
            for name in convert_file(shard, tmp_dir / shard.name, opts, summary, bar):
                weight_map[name] = shard.name
    finally:
        bar.close()
    index = {"metadata": {"total_size": summary.bytes_after}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    for other in sorted(src.iterdir()):
        if other.is_file() and other.suffix != ".safetensors" and other.name != INDEX_NAME:
            if other.name == "config.json":
                config = json.loads(other.read_text())
                if "quantization_config" in config:
                    raise ValueError(f"{other} already has a quantization_config; IN must be a float checkpoint")
                config["quantization_config"] = _quantization_config(opts, summary)
                (tmp_dir / other.name).write_text(json.dumps(config, indent=2) + "\n")
            else:
                shutil.copy2(other, tmp_dir / other.name)


def _replace_dir(tmp_dir: Path, dst: Path) -> None:
    """Move the finished folder to ``dst``; an existing ``dst`` (only with --force) is removed after."""
    os.chmod(tmp_dir, 0o777 & ~_umask())  # mkdtemp makes 0700
    old = None
    if dst.exists() or dst.is_symlink():
        old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old."))
        os.replace(dst, old / "x")
    os.replace(tmp_dir, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    try:
        import safetensors  # noqa: F401
    except ImportError:
        print("quantize needs the safetensors package: pip install 'kbit[safetensors]'", file=sys.stderr)
        return 1
    opts = Options(quant_type=args.quant_type, blocksize=args.blocksize, double_quant=args.double_quant,
                   quant_storage=args.quant_storage, compute_dtype=args.compute_dtype,
                   skip=tuple(args.skip) + (() if args.no_default_skip else DEFAULT_SKIP))
    src, dst = Path(args.input), Path(args.output)
    dst.parent.mkdir(parents=True, exist_ok=True)
    summary = Summary()
    tmp_dir = None
    try:
        if src.is_dir():
            tmp_dir = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp"))
            convert_folder(src, tmp_dir, opts, summary, args.progress)
            _replace_dir(tmp_dir, dst)
            tmp_dir = None
        else:
            if dst.is_dir():
                raise ValueError(f"OUT {dst} is a folder; name the output file")
            bar = progress(total=_count_tensors([src]), desc="quantize", unit="tensor", enabled=args.progress)
            try:
                convert_file(src, dst, opts, summary, bar)
            finally:
                bar.close()
    except KeyboardInterrupt:
        print("\ninterrupted: nothing written (temporary files removed)", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"quantize failed, nothing written: {exc}", file=sys.stderr)
        return 1
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    dq = "double quant" if opts.double_quant else "float32 scales"
    print(f"quantized {summary.quantized} tensors to {opts.quant_type.upper()} (blocksize {opts.blocksize}, {dq}, "
          f"stored as {opts.quant_storage}); kept {summary.kept} unchanged")
    if summary.skipped_weights:
        shown = ", ".join(summary.skipped_weights[:4]) + (" ..." if len(summary.skipped_weights) > 4 else "")
        print(f"kept in float by skip patterns: {shown}")
    share = summary.bytes_after / summary.bytes_before if summary.bytes_before else float("nan")
    print(f"tensor bytes: {_mib(summary.bytes_before)} -> {_mib(summary.bytes_after)} ({share:.1%} of the original)")
    print(f"wrote {dst}")
    return 0
