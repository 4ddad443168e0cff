"""A small vqad model's first training steps as its trainer takes them, for the kernel tests that compare two paths
of one step."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

from vqad_nerfstudio.models.vqad import VQADModel

from kernel_device import DEVICE


def straight_through_steps(
    steps: int = 3, freeze_at: Optional[int] = None, **settings: Any
) -> Tuple[torch.Tensor, VQADModel]:
    """A three-level model (``settings`` added to its config) under vqad's trainer optimisers (the logits' Adam in the
    backward pass), straight-through from the first step with the rate in the loss, trained ``steps`` steps on 64
    fixed rays (with ``freeze_at``, on frozen indices from that step on): each step's rgb and rate losses
    (``[steps, 2]``, the rate 0 once frozen) and the model."""
    from nerfstudio.cameras.rays import RayBundle
    from nerfstudio.data.scene_box import SceneBox
    from nerfstudio.engine.optimizers import Optimizers
    from vqad_nerfstudio.method_configs.vqad import vqad_model_config, vqad_trainer_config

    from vqad_nerfstudio.models.vqad import VQADModelConfig, _remap_optimizer_state

    origins = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    origins = 3 * origins / origins.norm(dim=-1, keepdim=True)
    bundle_values = dict(
        origins=origins.to(DEVICE),
        directions=(-origins / origins.norm(dim=-1, keepdim=True)).to(DEVICE),
        pixel_area=torch.ones(64, 1, device=DEVICE),
        camera_indices=torch.zeros(64, 1, dtype=torch.long, device=DEVICE),
    )
    batch = {"image": torch.rand(64, 3, generator=torch.Generator().manual_seed(2)).to(DEVICE)}
    optimizer_configs = vqad_trainer_config("vqad", vqad_model_config()).optimizers
    torch.manual_seed(0)
    config = VQADModelConfig(num_levels=3, base_resolution=4, dense_resolution=8, num_samples=48, hidden_dim=16,
                             index_bits=4, index_warmup_steps=0, coarse_lod_fraction=0.0, tf32=False,
                             index_rate_weight=1e-3, **settings)  # fmt: skip
    model = config.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=1)
    model = model.to(DEVICE).train()
    model._quantize_float_warmup()  # the warm-up's end, which the training callbacks run at step 0, with:
    model.round_decoder_weights()
    groups = model.get_param_groups()
    optimizers = Optimizers({name: optimizer_configs[name] for name in groups}, groups)
    losses = []
    for step in range(steps):
        if step == freeze_at:
            for remap in model._freeze_indices():
                _remap_optimizer_state(optimizers.optimizers.values(), remap)
        model.train()  # nerfstudio's trainer calls the pipeline's train() before every step
        optimizers.zero_grad_all()
        torch.manual_seed(3)  # the sampler's jitter
        outputs = model.get_outputs(model.collider(RayBundle(**bundle_values)))
        loss_dict = model.get_loss_dict(outputs, batch)
        sum(loss_dict.values()).backward()
        optimizers.optimizer_step_all()
        rate = loss_dict.get("index_rate", torch.zeros((), device=DEVICE))
        losses.append(torch.stack([loss_dict["rgb_loss"], rate]).detach())
    return torch.stack(losses), model
