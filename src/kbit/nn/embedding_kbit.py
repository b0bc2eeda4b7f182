"""Embedding4bit / EmbeddingNF4 / EmbeddingFP4 and Embedding8bit: frozen embedding tables stored in 4 or 8
bits, for large vocabularies.

Only the looked-up rows are dequantized when each row holds whole quantization blocks (embedding_dim a
multiple of the block size); otherwise the table is dequantized and indexed. Unlike bitsandbytes, both
save and load their state dict (bitsandbytes raises NotImplementedError on saving).
"""

from __future__ import annotations

import torch
import torch.nn.functional as TF

from .. import _checks
from ..functional import dequantize_4bit
from .params4bit import Params4bit
from .weight4bit import LoadGuard, Weight4bitMixin


class Embedding4bit(Weight4bitMixin, torch.nn.Embedding):
    """nn.Embedding with a frozen NF4/FP4 table (no double quantization, as bitsandbytes).

    Args: num_embeddings, embedding_dim; dtype of the output (default: the float weight's dtype);
    quant_type ``"fp4"`` or ``"nf4"``; quant_storage; device; blocksize (default 64, bitsandbytes' value;
    when ``embedding_dim`` is a multiple of it, a lookup dequantizes only the rows it reads).
    """

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_type="fp4", quant_storage=torch.uint8,
                 device=None, blocksize=64):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight = Params4bit(self.weight.data, requires_grad=False, blocksize=blocksize, compress_statistics=False,
                                 quant_type=quant_type, quant_storage=quant_storage, module=self)
        self.quant_state = None

    def _weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _checks.indices(input)
        weight = self._ensure_quantized()
        state = weight.quant_state
        dim = self.embedding_dim
        if dim % state.blocksize == 0 and not state.nested:
            # Whole blocks per row: gather the rows' bytes and scales, dequantize just those.
            rows = weight.data.view(torch.uint8).view(-1)[: self.num_embeddings * dim // 2].view(self.num_embeddings, dim // 2)
            absmax = state.absmax.view(self.num_embeddings, dim // state.blocksize)
            picked = TF.embedding(input, rows).reshape(-1)
            picked_absmax = TF.embedding(input, absmax).reshape(-1)
            out = torch.ops.kbit.dequantize_4bit(picked, picked_absmax.contiguous(), state.blocksize, state.quant_type,
                                                 [*input.shape, dim], torch.float32)
        else:
            out = TF.embedding(input, dequantize_4bit(weight, state).float())
        return out.to(self.dtype)


class EmbeddingFP4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="fp4"``."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None, blocksize=64):
        super().__init__(num_embeddings, embedding_dim, dtype, "fp4", quant_storage, device, blocksize)


class EmbeddingNF4(Embedding4bit):
    """:class:`Embedding4bit` with ``quant_type="nf4"``."""

    def __init__(self, num_embeddings, embedding_dim, dtype=None, quant_storage=torch.uint8, device=None, blocksize=64):
        super().__init__(num_embeddings, embedding_dim, dtype, "nf4", quant_storage, device, blocksize)


class Embedding8bit(torch.nn.Embedding):
    """nn.Embedding with a frozen int8 table, one float32 scale per row (row-wise absmax, as bitsandbytes'
    LLM.int8 weights): ``weight[i] ~= CB[i] * SCB[i] / 127``. Quantized on the first move to a device or at
    the first forward. The state dict holds ``weight`` (int8) and ``SCB`` (float32) once quantized."""

    def __init__(self, num_embeddings, embedding_dim, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self.dtype = self.weight.data.dtype
        self.weight.requires_grad_(False)
        self.register_buffer("SCB", None)

    def _quantize(self) -> None:
        w = self.weight.data.float()
        scb = w.abs().amax(dim=1)
        inv = torch.where(scb == 0, torch.zeros_like(scb), 127.0 / scb)
        self.weight = torch.nn.Parameter(torch.round(w * inv[:, None]).to(torch.int8), requires_grad=False)
        self.SCB = scb

    def _apply(self, fn, recurse=True):
        if self.SCB is None and self.weight.device.type != "meta":
            self._quantize()
        return super()._apply(fn, recurse)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _checks.indices(input)
        if self.SCB is None:
            self._quantize()
        rows = TF.embedding(input, self.weight).float()
        scale = TF.embedding(input, self.SCB.view(-1, 1)) / 127.0
        return (rows * scale).to(self.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight = state_dict.get(prefix + "weight")
        scb = state_dict.get(prefix + "SCB")
        shape = (self.num_embeddings, self.embedding_dim)
        guard = LoadGuard(self, error_msgs)
        if weight is not None:
            problem = None
            if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != shape:
                problem = f"the table must have shape {shape} (got {tuple(getattr(weight, 'shape', ()))})"
            elif weight.dtype == torch.int8:
                if (not isinstance(scb, torch.Tensor) or tuple(scb.shape) != (self.num_embeddings,)
                        or not scb.is_floating_point()):
                    problem = f"an int8 table needs SCB: {self.num_embeddings} float scales, one per row"
            elif not weight.is_floating_point():
                problem = f"the table must be int8 (with SCB) or float (got {weight.dtype})"
            if problem is not None:
                error_msgs.append(f"While loading {prefix}weight: {problem}")
                return
            if weight.dtype == torch.int8:
                self.weight = torch.nn.Parameter(torch.empty_like(weight, device=self.weight.device),
                                                 requires_grad=False)
                self.SCB = torch.empty_like(scb, dtype=torch.float32, device=self.weight.device)
            elif self.SCB is not None:
                # A float table into a quantized module: load it as float, requantize.
                self.weight = torch.nn.Parameter(torch.empty_like(weight, device=self.weight.device),
                                                 requires_grad=False)
                self.SCB = None
        guard.before_copy()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        guard.finish()  # nothing half-loaded
