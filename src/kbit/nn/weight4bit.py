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
        guard = LoadGuard(self, error_msgs)
        if stats and weight_key not in state_dict:
            error_msgs.append(f"While loading {weight_key}: the checkpoint has its statistics ({', '.join(sorted(stats))}) "
                              "but not the packed weight itself")
            return
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
        guard.before_copy()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        guard.finish()  # e.g. a wrong-shaped or missing bias: keep the old weight, not half of a checkpoint

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


class LoadGuard:
    """Makes one module's ``_load_from_state_dict`` all-or-nothing. torch raises only after visiting every
    module, so a module whose part failed (a wrong-shaped bias after a good weight) would keep whatever was
    loaded before the failure; the guard puts back its parameter and buffer objects, and the values of those the
    base class copied into in place.

    Missing and unexpected keys are not failures here: torch always passes ``strict=True`` down and decides
    afterwards, so this module cannot tell ``load_state_dict(sd, strict=False)`` (a deliberate partial load)
    from a strict one; like every torch module, it loads the entries that are present and valid.

    Use: ``guard = LoadGuard(self, ...)`` before replacing any tensor, ``guard.before_copy()`` right before the
    base class's ``_load_from_state_dict``, then ``guard.finish()``."""

    def __init__(self, module: torch.nn.Module, error_msgs: list):
        self.module, self.error_msgs, self.errors = module, error_msgs, len(error_msgs)
        self.params, self.buffers = dict(module._parameters), dict(module._buffers)
        self.attrs = {k: module.__dict__[k] for k in ("quant_state",) if k in module.__dict__}
        self.values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def before_copy(self) -> None:
        """Save the values of the tensors the base class may overwrite in place (the ones not replaced)."""
        current = [*self.module._parameters.values(), *self.module._buffers.values()]
        old = {id(t) for t in [*self.params.values(), *self.buffers.values()] if t is not None}
        self.values = [(t, t.detach().clone()) for t in current if t is not None and id(t) in old]

    def finish(self) -> bool:
        """Restore the module if its part of the load added an error; returns whether it did."""
        if len(self.error_msgs) == self.errors:
            return False
        self.module._parameters.clear()
        self.module._parameters.update(self.params)
        self.module._buffers.clear()
        self.module._buffers.update(self.buffers)
        self.module.__dict__.update(self.attrs)
        with torch.no_grad():
            for t, value in self.values:
                t.detach().copy_(value)
        return True
