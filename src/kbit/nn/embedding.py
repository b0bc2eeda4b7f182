"""Embeddings whose weights always get 32-bit optimizer state.

Embedding rows receive rare, spiky gradients; 8-bit state quantizes their outliers badly, so both
classes register ``optim_bits=32`` for their weight with the GlobalOptimManager: every kbit optimizer
(8-bit ones included) keeps this weight's state in float32. Non-kbit optimizers are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..optim.manager import GlobalOptimManager


class StableEmbedding(torch.nn.Embedding):
    """Embedding with Xavier-uniform initialization, a LayerNorm on its output, and 32-bit optimizer state
    (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", the stable embedding layer).

    Arguments as :class:`torch.nn.Embedding`. The LayerNorm runs in ``torch.get_default_dtype()`` and the
    output is cast back to the weight's dtype. Unlike bitsandbytes, ``device`` and ``dtype`` are passed to
    the weight correctly (bitsandbytes passes them positionally into the wrong parameters).
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, max_norm=max_norm,
                         norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, _weight=_weight,
                         device=device, dtype=dtype)
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device)
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        emb = F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        emb = emb.to(torch.get_default_dtype())
        return self.norm(emb).to(self.weight.dtype)


class Embedding(torch.nn.Embedding):
    """:class:`torch.nn.Embedding` with Xavier-uniform initialization and 32-bit optimizer state."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, device=None, dtype=None):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, max_norm=max_norm,
                         norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, _weight=_weight,
                         device=device, dtype=dtype)
        GlobalOptimManager.get_instance().register_module_override(self, "weight", {"optim_bits": 32})

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()
