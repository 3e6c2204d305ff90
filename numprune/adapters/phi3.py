"""Phi-3: the LLaMA layout with fused projections, ``qkv_proj`` rows [q; k; v] and ``gate_up_proj`` rows [gate; up]."""

from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import PHI3


class Phi3Adapter(StockAdapter):
    spec = PHI3  # no bias switches: an output-projection bias needs numprune's config
