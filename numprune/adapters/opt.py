"""OPT: ``model.decoder.layers``, q/k/v/out_proj with biases, a ReLU MLP fc1/fc2 with biases, no GQA.

The MLP is not gated: a channel is one fc1 row (+ bias) and one fc2 column. OPT derives head_dim
from hidden / heads, so a result with fewer heads needs numprune's config, uniform or not.
"""

from __future__ import annotations

from numprune.adapters.stock import StockAdapter
from numprune.modeling.families import OPT


class OPTAdapter(StockAdapter):
    spec = OPT
    learned_positions = True

    def stock_bias_fields(self, attention: bool, mlp: bool) -> dict | None:
        return {"enable_bias": bool(self.config.enable_bias) or attention or mlp}
