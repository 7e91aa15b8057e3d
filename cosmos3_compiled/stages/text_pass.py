"""Stage: run the text tower once per CFG branch into static per-layer K/V buffers."""

from __future__ import annotations

import torch

from cosmos3_compiled import fp8
from cosmos3_compiled.model import Cosmos3Transformer

from .state import State


class TextPass:
    """Reads cond_ids, uncond_ids; writes branches ([cond] or [cond, uncond]).

    `only_branch`: under CFG parallelism this rank runs one branch (0 cond, 1 uncond) when there are two.
    `precision`: an FP8 checkpoint's policy; the text tower then runs in the first denoising step's regime (the
    reference runs it inside every step), and Denoise calls `fill` again wherever the regime changes.
    """

    def __init__(self, transformer: Cosmos3Transformer, only_branch: int | None = None,
                 precision: fp8.Fp8Policy | None = None):
        self.model = transformer
        self.only_branch = only_branch
        self.precision = precision

    def _prompts(self, state: State) -> list[list[int]]:
        prompts = [ids for ids in (state.cond_ids, state.uncond_ids) if ids is not None]
        if self.only_branch is not None and len(prompts) == 2:
            prompts = [prompts[self.only_branch]]
        return prompts

    def __call__(self, state: State) -> State:
        r = state.request
        if self.precision is not None:
            fp8.set_step_regime(self.model, self.precision, 0, r.num_inference_steps)
        segment = {} if r.action is None else dict(
            action_len=r.action.chunk_size, action_clean=r.action.actions_clean, action_domain=r.action.domain_id,
            action_width=r.action.raw_dim)
        state.branches = [self.model.setup_branch(len(ids), r.latent_shape, fps=r.fps, clean_frames=r.clean_frames,
                                                   sound_len=r.sound_len, **segment)
                          for ids in self._prompts(state)]
        self.fill(state)
        return state

    def fill(self, state: State) -> None:
        """The text K/V of every branch (rows [:L] of its buffers, in place) with the model's current FP8 modes."""
        # all branches layer by layer: an offloaded text tower crosses to the GPU once per request
        self.model.text_passes([(torch.tensor(ids, dtype=torch.long), b)
                                for ids, b in zip(self._prompts(state), state.branches)])
