"""Putting another position encoding into nerfstudio's nerfacto field."""

from __future__ import annotations

from nerfstudio.field_components.encodings import Encoding
from nerfstudio.field_components.mlp import MLP
from nerfstudio.fields.nerfacto_field import NerfactoField
from torch import nn


def replace_base_encoding(
    field: NerfactoField, encoding: Encoding, num_layers: int, hidden_dim: int, implementation: str
) -> None:
    """Make ``field`` look positions up in ``encoding`` instead of its own hash grid.

    nerfacto's density network is ``mlp_base = hash grid -> MLP(1 + geo_feat_dim)``; this swaps the
    grid and rebuilds the MLP for the new feature width, leaving everything else of the field as is.
    """
    field.mlp_base = nn.Sequential(
        encoding,
        MLP(
            in_dim=encoding.get_out_dim(),
            num_layers=num_layers,
            layer_width=hidden_dim,
            out_dim=1 + field.geo_feat_dim,
            activation=nn.ReLU(),
            out_activation=None,
            implementation=implementation,  # type: ignore[arg-type]
        ),
    )
