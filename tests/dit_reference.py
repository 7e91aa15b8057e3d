"""Test helper: diffusers' Cosmos3 transformer called exactly as its pipeline calls it, for one CFG branch."""

from __future__ import annotations

import types

import torch
from helpers import randomize_


def build_reference_transformer(seed: int = 0, **config):
    """diffusers' Cosmos3OmniTransformer with every weight drawn by `helpers.randomize_` (every path matters)."""
    from diffusers import Cosmos3OmniTransformer

    return randomize_(Cosmos3OmniTransformer(**config), seed).eval()


def reference_velocity(model, input_ids: list[int], latents: torch.Tensor, timestep: int, fps: float,
                       clean_frames: tuple[int, ...] = ()) -> torch.Tensor:
    """One transformer call for one branch, arguments built with the pipeline's own segment helpers."""
    from diffusers.pipelines.cosmos.pipeline_cosmos3_omni import Cosmos3OmniPipeline

    fake = types.SimpleNamespace(transformer=model, vae_scale_factor_temporal=4)
    device = latents.device
    text = Cosmos3OmniPipeline._prepare_text_segment(fake, input_ids, device=device)
    vision = Cosmos3OmniPipeline._prepare_vision_segment(
        fake, input_vision_tokens=latents, has_image_condition=bool(clean_frames),
        mrope_offset=text["vision_start_temporal_offset"], vision_fps=fps, curr=text["und_len"], device=device,
        condition_frame_indexes=list(clean_frames),
    )
    dtype = next(model.parameters()).dtype
    preds, _, _ = model(
        input_ids=text["input_ids"], text_indexes=text["text_indexes"],
        position_ids=torch.cat([text["text_mrope_ids"], vision["vision_mrope_ids"]], dim=1),
        und_len=text["und_len"], sequence_length=text["und_len"] + vision["num_vision_tokens"],
        vision_tokens=[latents.to(dtype)], vision_token_shapes=vision["vision_token_shapes"],
        vision_sequence_indexes=vision["vision_sequence_indexes"],
        vision_mse_loss_indexes=vision["vision_mse_loss_indexes"],
        vision_timesteps=torch.full((vision["num_noisy_vision_tokens"],), timestep, device=device),
        vision_noisy_frame_indexes=vision["vision_noisy_frame_indexes"], return_dict=False,
    )
    mask = torch.ones(latents.shape[2], 1, 1, device=device)
    for f in clean_frames:
        mask[f] = 0
    return (preds[0] * mask.to(preds[0].dtype)).float()
