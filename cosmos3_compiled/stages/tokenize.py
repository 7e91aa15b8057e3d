"""Stage: prompt → token ids for the cond and uncond branches (Cosmos3 templates + chat template)."""

from __future__ import annotations

from cosmos3_compiled.prompting import PromptTokenizer, build_prompt_ids

from .state import State


class Tokenize:
    """Reads request; writes cond_ids, uncond_ids (None when guidance is 1), metrics["text_tokens"]."""

    def __init__(self, tokenizer: PromptTokenizer):
        self.tokenizer = tokenizer

    def __call__(self, state: State) -> State:
        r = state.request
        cond, uncond = build_prompt_ids(
            self.tokenizer, r.prompt, r.negative_prompt, num_frames=r.num_frames, height=r.height, width=r.width,
            fps=r.fps, use_system_prompt=r.use_system_prompt, add_resolution_template=r.add_resolution_template,
            add_duration_template=r.add_duration_template,
        )
        state.cond_ids, state.uncond_ids = cond, (uncond if r.use_cfg else None)
        state.metrics["text_tokens"] = {"cond": len(cond), "uncond": len(uncond) if r.use_cfg else 0}
        return state
