"""Perplexity evaluation."""

from numprune.evaluate.perplexity import perplexity

__all__ = ["perplexity"]
