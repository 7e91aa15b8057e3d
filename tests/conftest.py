import os

import pytest
import torch

# Tests (and the processes they start) use no persistent compile cache unless a test names one: a warm cache
# left by an earlier test or run would change what later tests compile. tests/test_defaults.py tests the default.
os.environ["COSMOS3_COMPILED_CACHE_DIR"] = ""


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _reset_dynamo():
    """Each test starts with no compiled code and no models kept from an earlier test's jobs."""
    from cosmos3_compiled.resident import RESIDENT

    RESIDENT.drop()
    torch.compiler.reset()
    yield
    RESIDENT.drop()
    torch.compiler.reset()


@pytest.fixture
def fa4_on_cpu(monkeypatch):
    """Stand in for the FlashAttention-4 kernel on the CPU (token-major in and out, native GQA, SDPA maths) so
    the layout handling and the compiler's view of the `cosmos3::fa4_attention` op are tested here; the
    kernel itself is GPU-only (tests/test_gpu_kernels.py)."""
    from cosmos3_compiled import attention

    def cpu_kernel(q, k, v, causal):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2).contiguous()

    attention.fa4_attention.register_kernel("cpu", cpu_kernel)
    monkeypatch.setattr(attention, "check_backend", lambda *args: None)
