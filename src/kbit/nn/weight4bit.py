"""Weight4bitMixin: what every module with a Params4bit ``weight`` shares — quantization on first use and
checkpoints in bitsandbytes' layout (``weight`` plus the ``weight.*`` statistics), loadable directly."""

from __future__ import annotations

import torch

from ..functional import QuantState
from .params4bit import Params4bit, check_packed_matches


class Weight4bitMixin:
    """For nn.Module subclasses whose ``weight`` is a Params4bit; ``_weight_shape()`` gives its float shape."""

    def _weight_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _ensure_quantized(self) -> Params4bit:
        weight = self.weight
        if not isinstance(weight, Params4bit):
            raise TypeError(f"{type(self).__name__}.weight must be a Params4bit; assign weights through load_state_dict")
        if not weight.bnb_quantized:
            weight._quantize(weight.device)
        # Assign only on change: nn.Module.__setattr__ costs microseconds, and this runs on every call.
        if weight.module is not self:
            weight.module = self
        if self.quant_state is not weight.quant_state:
            self.quant_state = weight.quant_state
        return weight

    # ---- checkpoints ---------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = getattr(self.weight, "quant_state", None)
        if state is not None and self.weight.bnb_quantized:
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight_key = prefix + "weight"
        stats = {k[len(weight_key) + 1:]: v for k, v in state_dict.items() if k.startswith(weight_key + ".")}
        old_weight, old_state = self.weight, self.quant_state
        if weight_key in state_dict:
            try:
                new_weight = self._weight_from_checkpoint(state_dict[weight_key], stats)
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"While loading {weight_key}: {exc}")
                return
            self.weight = new_weight
            self.quant_state = new_weight.quant_state
            # The base class copies `weight` into the parameter just set (a no-op) and would report the
            # statistics entries as unexpected: they are consumed here.
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(weight_key + ".")}
            state_dict[weight_key] = new_weight.data
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) > errors:  # e.g. a wrong-shaped bias: keep the old weight, not half of a checkpoint
            self.weight, self.quant_state = old_weight, old_state

    def _weight_from_checkpoint(self, data: torch.Tensor, stats: dict) -> Params4bit:
        """A quantized checkpoint (``weight`` + ``weight.absmax``/... entries) or a float weight."""
        old = self.weight
        device = old.device
        if stats:
            state = QuantState.from_dict(stats, device=device)
            expected = self._weight_shape()
            if tuple(state.shape) != expected:
                raise ValueError(f"checkpoint weight has shape {tuple(state.shape)}, this layer needs {expected}")
            check_packed_matches(data, state)
            return Params4bit(data.detach().to(device), requires_grad=False, quant_state=state,
                              blocksize=state.blocksize, compress_statistics=state.nested, quant_type=state.quant_type,
                              quant_storage=data.dtype, module=self, bnb_quantized=True)
        if not data.is_floating_point() or tuple(data.shape) != self._weight_shape():
            raise ValueError(
                f"expected a float weight of shape {self._weight_shape()} or a quantized checkpoint "
                f"with its weight.* statistics; got {data.dtype} {tuple(data.shape)} and no statistics"
            )
        weight = Params4bit(data.detach().to(device=device, dtype=data.dtype).clone(), requires_grad=False,
                            blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                            quant_type=old.quant_type, quant_storage=old.quant_storage, module=self)
        if old.bnb_quantized:  # the layer was already quantized: keep it so
            weight._quantize(device)
        return weight


