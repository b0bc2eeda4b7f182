"""kbit.nn: layers with bitsandbytes' names (more arrive with the 4-bit layers)."""

from .embedding import Embedding, StableEmbedding

__all__ = ["Embedding", "StableEmbedding"]
