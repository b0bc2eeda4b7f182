"""kbit.nn: layers with bitsandbytes' names — 4-bit linear layers and embeddings with 32-bit optimizer state."""

from .embedding import Embedding, StableEmbedding
from .embedding_kbit import Embedding4bit, Embedding8bit, EmbeddingFP4, EmbeddingNF4
from .linear4bit import Linear4bit, LinearFP4, LinearNF4, replace_linear_4bit
from .params4bit import Params4bit

__all__ = ["Embedding", "StableEmbedding", "Embedding4bit", "Embedding8bit", "EmbeddingFP4", "EmbeddingNF4", "Params4bit", "Linear4bit", "LinearFP4", "LinearNF4", "replace_linear_4bit"]
