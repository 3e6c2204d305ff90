"""``numprune info``: parameters and per-layer heads and channels of a model."""

from __future__ import annotations

from numprune.adapters import adapter_for
from numprune.cli import args as a
from numprune.cli.inputs import load


def add_parser(commands) -> None:
    p = commands.add_parser("info", help="parameters and per-layer heads and channels of a model")
    a.add_model(p)
    p.set_defaults(run=run)


def run(args) -> int:
    model, _, source = load(args.model)
    adapter = adapter_for(model)
    total = sum(p.numel() for p in model.parameters())
    prunable = sum(adapter.prunable_parameters(i) for i in range(adapter.num_layers()))
    print(f"model: {source}")
    print(f"family: {adapter.family} ({type(model.config).__name__}), {adapter.num_layers()} layers, "
          f"{total:,} parameters, {prunable:,} in attention+MLP")
    print("layer  heads  kv_heads  head_dim  mlp_channels")
    for i in range(adapter.num_layers()):
        layout = adapter.attention_layout(i)
        print(f"{i:5d}  {layout.num_heads:5d}  {layout.num_kv_heads:8d}  {layout.head_dim:8d}  {adapter.mlp_width(i):12d}")
    return 0
