"""Post-training vector quantisation of a vqad-float model into a vqad model (VQRF's compression, without its
fine-tuning): same topology and decoder MLPs, each level's float vertex features replaced by a codebook and one
index per vertex, chosen by importance-weighted, entropy-constrained k-means. The result is a model like a decoded
file's (frozen indices): it renders, evaluates and exports as a vqad file."""

from __future__ import annotations

import dataclasses
from typing import Any, List, Mapping, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from vqad_nerfstudio.encodings.kmeans import vector_quantize
from vqad_nerfstudio.encodings.vertex_features import CodebookFeatures, FloatFeatures
from vqad_nerfstudio.models.vqad import VQADModel
from vqad_nerfstudio.progress import track


def fisher_from_optimizer_state(model: VQADModel, state: Mapping[str, Any]) -> List[Optional[Float[Tensor, "m"]]]:
    """Per level, the diagonal Fisher information of each vertex (Adam's running mean of its squared gradient,
    summed over the feature channels) from a nerfstudio checkpoint's ``optimizers`` entry: the state of the
    ``grid_features`` optimiser, whose parameters are the levels' float rows in order. None for a level without
    matching state (then its vertices count alike)."""
    adam = state.get("grid_features", {}).get("state", {})
    importance: List[Optional[Tensor]] = []
    for lod, level in enumerate(model.grid.levels):
        second_moment = adam.get(lod, {}).get("exp_avg_sq")
        rows = level.features.num_rows
        fits = torch.is_tensor(second_moment) and second_moment.shape == (rows, level.features.feature_dim)
        importance.append(second_moment.float().sum(dim=-1) if fits else None)
    return importance


@torch.no_grad()
def quantize_float_model(
    model: VQADModel,
    index_bits: int = 8,
    rate: float = 0.0,
    importance: Optional[Sequence[Optional[Float[Tensor, "m"]]]] = None,
    generator: Optional[torch.Generator] = None,
) -> VQADModel:
    """A vqad model (frozen indices, eval mode, on ``model``'s device) quantising the float features of ``model``
    (a vqad-float model) level by level into codebooks of ``2**index_bits`` codewords.

    ``importance``: per level, how much each vertex's error costs (see :func:`fisher_from_optimizer_state`);
    ``rate``: the entropy-constrained trade-off of :func:`~vqad_nerfstudio.encodings.kmeans.vector_quantize` (bits
    of an index against the level's mean weighted error; 0: nearest codeword)."""
    if model.config.feature_store != "float":
        raise ValueError("post-training quantisation takes a vqad-float model (float vertex features)")
    levels = model.grid.levels
    if importance is not None and len(importance) != len(levels):
        raise ValueError(f"importance must hold one entry per level ({len(levels)}), got {len(importance)}")
    config = dataclasses.replace(model.config, feature_store="codebook", index_bits=index_bits, frozen_indices=True)
    device = next(model.parameters()).device
    twin: VQADModel = config.setup(scene_box=model.scene_box, num_train_data=model.num_train_data).to(device)
    twin.field.density_mlp.load_state_dict(model.field.density_mlp.state_dict())
    twin.field.color_mlp.load_state_dict(model.field.color_mlp.state_dict())
    twin.grid.pruned_flag.copy_(model.grid.pruned_flag)
    for lod in track(range(len(levels)), f"Quantising levels into {2**index_bits} codewords each"):
        level, twin_level = levels[lod], twin.grid.levels[lod]
        twin_level.set_cells(level.cells.clone(), in_place=True)
        store, twin_store = level.features, twin_level.features
        assert isinstance(store, FloatFeatures) and isinstance(twin_store, CodebookFeatures)
        if store.num_rows == 0:
            continue
        level_importance = None if importance is None else importance[lod]
        codebook, costs = vector_quantize(store.features, 2**index_bits, level_importance, rate, generator=generator)
        twin_store.load_codewords(codebook, costs.argmin(dim=-1))
    twin.cap_lod_slider()
    return twin.eval()


__all__ = ["fisher_from_optimizer_state", "quantize_float_model"]
