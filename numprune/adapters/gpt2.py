"""GPT-2: ``transformer.h``, transformers' ``Conv1D`` projections (weights stored [in, out], always a bias),
fused ``attn.c_attn`` columns [q | k | v], ``attn.c_proj``, a GELU MLP ``mlp.c_fc`` / ``mlp.c_proj``.

The MLP is not gated: a channel is one c_fc column (+ bias) and one c_proj row. GPT-2 derives
head_dim from hidden / heads, so a result with fewer heads needs numprune's config, uniform or not.
"""

from __future__ import annotations

from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import GPT2


class GPT2Adapter(StockAdapter):
    spec = GPT2
    learned_positions = True

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        return {}  # every Conv1D has a bias already
