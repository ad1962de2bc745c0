"""The sampler of vqgpt: class labels -> prior -> codes -> images."""

from .pipeline import ClassConditionalPipeline

__all__ = ["ClassConditionalPipeline"]
