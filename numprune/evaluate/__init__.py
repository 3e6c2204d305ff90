"""Evaluations: the seam (``Evaluation``, ``Column``, ``Measurement``) and perplexity, its text implementation."""

from numprune.evaluate.base import Column, Evaluation, Measurement
from numprune.evaluate.perplexity import Perplexity, perplexity

__all__ = ["Column", "Evaluation", "Measurement", "Perplexity", "perplexity"]
