"""Stage: run the text tower once per CFG branch into static per-layer K/V buffers."""

from __future__ import annotations

import torch

from .state import Components, State


class TextPass:
    """Reads cond_ids / uncond_ids; writes branches ([cond] or [cond, uncond]; under CFG parallelism only
    this rank's branch: [cond] on CFG rank 0, [uncond] on CFG rank 1)."""

    def __init__(self, components: Components):
        self.model = components.transformer
        self.parallel = components.parallel

    def __call__(self, state: State) -> State:
        r = state.request
        state.branches = []
        prompts = [ids for ids in (state.cond_ids, state.uncond_ids) if ids is not None]
        par = self.parallel
        if par is not None and par.cfg_size == 2 and len(prompts) == 2:
            prompts = [prompts[par.cfg_rank]]
        for ids in prompts:
            state.branches.append(self.model.setup_branch(len(ids), r.latent_shape, fps=r.fps,
                                                          clean_frames=r.clean_frames))
        # all branches layer by layer: an offloaded text tower crosses to the GPU once per request
        self.model.text_passes([(torch.tensor(ids, dtype=torch.long), b) for ids, b in zip(prompts, state.branches)])
        return state
