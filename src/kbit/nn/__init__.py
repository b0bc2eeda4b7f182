"""kbit.nn: layers with bitsandbytes' names — 4-bit linear layers and embeddings with 32-bit optimizer state."""

from .embedding import Embedding, StableEmbedding
from .linear4bit import Linear4bit, LinearFP4, LinearNF4, replace_linear_4bit
from .params4bit import Params4bit

__all__ = ["Embedding", "StableEmbedding", "Params4bit", "Linear4bit", "LinearFP4", "LinearNF4", "replace_linear_4bit"]
