"""The VQAD radiance field: a sparse learned-index grid decoded by two small MLPs.

density, geometry features = density MLP(grid features summed over levels <= LOD)
colour = colour MLP(geometry features, spherical-harmonics encoded view direction)
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

import torch
from jaxtyping import Bool, Float, Int
from nerfstudio.cameras.rays import RaySamples
from nerfstudio.data.scene_box import SceneBox
from nerfstudio.field_components.activations import trunc_exp
from nerfstudio.field_components.encodings import SHEncoding
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.field_components.mlp import MLP
from nerfstudio.field_components.spatial_distortions import SceneContraction
from nerfstudio.fields.base_field import Field
from torch import Tensor, nn

from vqad_nerfstudio.encodings.sparse_grid import SparseFeatureGrid
from vqad_nerfstudio.fields.quantized_linear import quantizable_layers
from vqad_nerfstudio.kernels import fused_mlp, spherical_harmonics
from vqad_nerfstudio.kernels.captured import CapturedWork, place
from vqad_nerfstudio.rounding import straight_through_group


class VQADField(Field):
    """Radiance field over a :class:`SparseFeatureGrid` (learned-index or float features)."""

    fused_decoders: bool = False
    """Run the decoder MLPs with :mod:`~vqad_nerfstudio.kernels.fused_mlp` where it can (same parameters)."""

    def __init__(
        self,
        aabb: Float[Tensor, "2 3"],
        grid: SparseFeatureGrid,
        unbounded: bool = False,
        hidden_dim: int = 64,
        geo_feat_dim: int = 15,
        sh_degree: int = 4,
    ) -> None:
        super().__init__()
        self.register_buffer("aabb", aabb.clone())
        self.grid = grid
        self.contraction = SceneContraction(order=float("inf")) if unbounded else None
        self.geo_feat_dim = geo_feat_dim
        self.direction_encoding = SHEncoding(levels=sh_degree, implementation="torch")
        self.density_mlp = MLP(
            in_dim=grid.feature_dim,
            num_layers=2,
            layer_width=hidden_dim,
            out_dim=1 + geo_feat_dim,
            activation=nn.ReLU(),
            out_activation=None,
            implementation="torch",
        )
        self.color_mlp = MLP(
            in_dim=geo_feat_dim + self.direction_encoding.get_out_dim(),
            num_layers=3,
            layer_width=hidden_dim,
            out_dim=3,
            activation=nn.ReLU(),
            out_activation=nn.Sigmoid(),
            implementation="torch",
        )

        self.decoder_layers = quantizable_layers(self.density_mlp) + quantizable_layers(self.color_mlp)
        self.rounding_graph = CapturedWork(slots=1)
        """Rounds the decoder weights in one CUDA graph replay on the GPU (:meth:`decoders_rounded_once`; training and
        renders round the same weights)."""

    def set_weight_bits(self, bits: Optional[int]) -> None:
        """Forward passes use the decoder weights rounded to ``bits`` bits per weight (None: as they are)."""
        for layer in self.decoder_layers:
            layer.bits = bits

    @contextmanager
    def decoders_rounded_once(self) -> Iterator[None]:
        """Within this block the decoder weights are rounded once (to the bits set), not at every pass, and reach
        their float weights' gradients through one autograd node; on the GPU all of them by one replay of
        :attr:`rounding_graph`."""
        rounded = [layer for layer in self.decoder_layers if layer.bits is not None]
        key = tuple((place(layer.weight), layer.bits) for layer in rounded)
        work = lambda _: [layer.round_weight() for layer in rounded]  # noqa: E731
        weights = self.rounding_graph.run(key, (), work, self.aabb.device) if rounded else ()
        for layer, weight in zip(rounded, straight_through_group([layer.weight for layer in rounded], weights)):
            layer.hold_rounding(True, weight)
        try:
            yield
        finally:
            for layer in self.decoder_layers:
                layer.hold_rounding(False)

    def to_unit_cube(self, positions: Float[Tensor, "*bs 3"]) -> Float[Tensor, "*bs 3"]:
        """World positions to the grid's [0, 1]^3 (scene box, or contracted space for unbounded scenes)."""
        if self.contraction is not None:
            return (self.contraction(positions) + 2.0) / 4.0
        return SceneBox.get_normalized_positions(positions, self.aabb)

    def density_at(
        self,
        unit_positions: Float[Tensor, "n 3"],
        lod: Optional[Int[Tensor, "n"]] = None,
        located: Optional[Int[Tensor, "n l"]] = None,
    ) -> Tuple[Float[Tensor, "n 1"], Float[Tensor, "n g"], Bool[Tensor, "n"]]:
        """Density (zero outside occupied space), geometry features and occupancy at unit-cube points, at levels of
        detail ``lod`` (default: the finest); ``located``: the points' cells if already found
        (:meth:`SparseFeatureGrid.locate`)."""
        features, inside = self.grid(unit_positions, lod, located)
        if self.fused_decoders and fused_mlp.available(self.density_mlp, features):
            raw, geo = fused_mlp.mlp_forward(self.density_mlp, features, split=1)
        else:
            hidden = self.density_mlp(features)
            raw, geo = hidden[:, :1], hidden[:, 1:]
        density = torch.where(inside[:, None], trunc_exp(raw - 1.0), 0.0)
        return density, geo, inside

    def rgb_at(self, geo_features: Float[Tensor, "n g"], directions: Float[Tensor, "n 3"]) -> Float[Tensor, "n 3"]:
        """View-dependent colour from geometry features and unit view directions (their spherical harmonics in one
        kernel where the grid uses fused kernels, nerfstudio's encoding otherwise)."""
        levels = self.direction_encoding.levels
        if self.grid.fused and spherical_harmonics.available(directions, levels):
            encoded = spherical_harmonics.spherical_harmonics(directions, levels)
        else:
            encoded = self.direction_encoding(directions)
        if self.fused_decoders and fused_mlp.available(self.color_mlp, geo_features, encoded):
            return fused_mlp.mlp_forward(self.color_mlp, geo_features, encoded)[0]
        return self.color_mlp(torch.cat([geo_features, encoded], dim=-1))

    # nerfstudio's Field API, for tools that query fields on RaySamples.
    def get_density(self, ray_samples: RaySamples) -> Tuple[Tensor, Tensor]:
        positions = ray_samples.frustums.get_positions()
        shape = positions.shape[:-1]
        density, geo, _ = self.density_at(self.to_unit_cube(positions).reshape(-1, 3))
        return density.reshape(*shape, 1), geo.reshape(*shape, -1)

    def get_outputs(
        self, ray_samples: RaySamples, density_embedding: Optional[Tensor] = None
    ) -> Dict[FieldHeadNames, Tensor]:
        assert density_embedding is not None
        shape = density_embedding.shape[:-1]
        directions = ray_samples.frustums.directions.reshape(-1, 3)
        rgb = self.rgb_at(density_embedding.reshape(-1, self.geo_feat_dim), directions)
        return {FieldHeadNames.RGB: rgb.reshape(*shape, 3)}
