"""Does the block-scaled GEMM path survive torch.compile? Compiles a 1-layer per-group model with and without the
quant fusions on the GPU and reports whether ``torch._scaled_mm`` rejected any call (and why), and the scales'
strides each scaled_mm call receives (python3 scripts/diag_blockwise_in_graph.py)."""

import torch

from fusiontune.harness.model import DecoderStack
from fusiontune.harness.presets import build_model_config
from fusiontune.kernels import linear
from fusiontune.passes.config import resolve
from fusiontune.passes.manager import PassManager
from fusiontune.passes.platform import Platform

seen = []
original = linear._scaled_mm_cuda


def spy(a, a_scale, b, b_scale, group_size, out_dtype):
    seen.append((tuple(a.shape), tuple(a_scale.shape), a_scale.stride()))
    return original(a, a_scale, b, b_scale, group_size, out_dtype)


torch.library.register_kernel("fusiontune::scaled_mm", "cuda", spy)
cfg = build_model_config("qwen3-8b", num_layers=1, quant="fp8-per-group")
model = DecoderStack(cfg, device="cuda")
for flags in ({"fuse_norm_quant": False, "fuse_act_quant": False}, {"fuse_norm_quant": False, "fuse_act_quant": True}):
    linear._BLOCKWISE_REFUSED.clear()
    seen.clear()
    torch._dynamo.reset()
    manager = PassManager(resolve(flags, 2, Platform.detect(1, cfg.hidden_size, 2, cfg.quant)))
    fn = torch.compile(model, fullgraph=True, options={"post_grad_custom_post_pass": manager})
    x = torch.randn(16, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        fn(x)
    print(flags, "matches", dict(manager.matches))
    print("  scaled_mm calls (a shape, a_scale shape, a_scale strides):", seen)
    print("  block-scaled GEMM refusals:", linear._BLOCKWISE_REFUSED)
