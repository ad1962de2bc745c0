"""A lossy image codec from a tokenizer and its prior (codes entropy-coded with the prior's distributions)."""

from .codec import Codec, CodecError, integer_table

__all__ = ["Codec", "CodecError", "integer_table"]
