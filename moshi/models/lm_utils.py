"""The LM's embedding table and norm factory, under the module path Kyutai's package gives them."""

from ..modules.transformer import create_norm_fn
from .lm import ScaledEmbedding

__all__ = ["ScaledEmbedding", "create_norm_fn"]
