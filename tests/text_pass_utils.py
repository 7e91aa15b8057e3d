"""Test helper: a request's text pass done two ways, one prompt at a time and all prompts layer by layer."""

from __future__ import annotations

import torch

GRID = (2, 4, 6)  # latent frames, patch rows, patch columns of the branches' video part


def text_kv_both_ways(one_at_a_time, layer_by_layer, prompts: list[torch.Tensor]):
    """(branches filled by `one_at_a_time.text_pass` per prompt, branches filled by one
    `layer_by_layer.text_passes` over all prompts); the two models may be one."""
    one = [one_at_a_time.setup_branch(len(ids), GRID, fps=24.0) for ids in prompts]
    for ids, branch in zip(prompts, one):
        one_at_a_time.text_pass(ids, branch)
    both = [layer_by_layer.setup_branch(len(ids), GRID, fps=24.0) for ids in prompts]
    layer_by_layer.text_passes(list(zip(prompts, both)))
    return one, both


def same_text_kv(a, b) -> bool:
    """Every K and V buffer of branches `a` equals (bit for bit) its counterpart in `b`."""
    return all(torch.equal(ka, kb) and torch.equal(va, vb)
               for x, y in zip(a, b, strict=True)
               for ka, kb, va, vb in zip(x.k_bufs, y.k_bufs, x.v_bufs, y.v_bufs, strict=True))
