"""Where a decoder layer keeps what structured pruning cuts, said once per family as module paths.

The pruning stages need nothing else from a family: the head layout, each unit's parameter cost
and the slices of every tensor all follow from these paths (numprune.adapters.base).
"""

from __future__ import annotations

from dataclasses import dataclass

QUERY, KV, MLP = "q", "kv", "mlp"  # what the rows of an input projection's block carry


@dataclass(frozen=True)
class LayerModules:
    """Module paths inside one decoder layer.

    ``inputs`` are the projections whose output rows are cut, each with the blocks its rows hold
    in order: ``(QUERY,)`` for q_proj, ``(KV,)`` for k_proj or v_proj, ``(QUERY, KV, KV)`` for a fused
    [q; k; v] projection, ``(MLP, MLP)`` for a fused [gate; up] one. The two output projections lose
    input columns instead. ``attention`` is the block whose ``head_dim`` attribute gives the head size.
    """

    attention: str
    inputs: tuple[tuple[str, tuple[str, ...]], ...]
    attention_output: str
    mlp_output: str


LLAMA_MODULES = LayerModules(
    attention="self_attn",
    inputs=(("self_attn.q_proj", (QUERY,)), ("self_attn.k_proj", (KV,)), ("self_attn.v_proj", (KV,)),
            ("mlp.gate_proj", (MLP,)), ("mlp.up_proj", (MLP,))),
    attention_output="self_attn.o_proj", mlp_output="mlp.down_proj")
