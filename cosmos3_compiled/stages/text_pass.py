"""Stage: run the text tower once per CFG branch into static per-layer K/V buffers."""

from __future__ import annotations

import torch

from cosmos3_compiled.model import Cosmos3Transformer

from .state import State


class TextPass:
    """Reads cond_ids, uncond_ids; writes branches ([cond] or [cond, uncond]).

    `only_branch`: under CFG parallelism this rank runs one branch (0 cond, 1 uncond) when there are two.
    """

    def __init__(self, transformer: Cosmos3Transformer, only_branch: int | None = None):
        self.model = transformer
        self.only_branch = only_branch

    def __call__(self, state: State) -> State:
        r = state.request
        prompts = [ids for ids in (state.cond_ids, state.uncond_ids) if ids is not None]
        if self.only_branch is not None and len(prompts) == 2:
            prompts = [prompts[self.only_branch]]
        state.branches = [self.model.setup_branch(len(ids), r.latent_shape, fps=r.fps, clean_frames=r.clean_frames,
                                                   sound_len=r.sound_len)
                          for ids in prompts]
        # all branches layer by layer: an offloaded text tower crosses to the GPU once per request
        self.model.text_passes([(torch.tensor(ids, dtype=torch.long), b) for ids, b in zip(prompts, state.branches)])
        return state
