"""The shared workload, model shapes and FLOP formula of the peer baseline (../shared/bench), with copies used only where that
folder is absent. Every benchmark script imports them from here."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(os.environ.get("VLMKIT_PEER_BENCH", REPO.parent / "shared" / "bench"))
IMAGE_TOKENS = 576

# the peer's model shapes
LLMS = {  # model_type, hidden, intermediate, layers, heads, kv_heads, vocab (the peer's shapes)
    "7b": ("llama", 4096, 11008, 32, 32, 32, 32064),  # Vicuna-7B / Llama-2-7B
    "1.5b": ("qwen2", 1536, 8960, 28, 12, 2, 151936),  # Qwen2-1.5B
    "0.5b": ("qwen2", 896, 4864, 24, 14, 2, 151936),  # Qwen2-0.5B
    "tiny": ("llama", 64, 128, 2, 2, 2, 1024),  # smoke tests on CPU
}
VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, image_size=336, patch_size=14)  # CLIP ViT-L/14-336
TINY_VISION = dict(VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)



def _text_lengths(n, stage=2, seed=0):
    """A copy of workload.text_lengths (used only when ../shared/bench is absent)."""
    rng = np.random.default_rng(seed)
    if stage == 1:
        x = rng.lognormal(mean=math.log(60), sigma=0.3, size=n)
        return np.clip(np.rint(x), 16, 128).astype(int).tolist()
    x = rng.lognormal(mean=math.log(250), sigma=0.8, size=n)
    return np.clip(np.rint(x), 16, 1472).astype(int).tolist()


def _flops_per_sample(cfg, text_len, stage):
    """A copy of peer_hf_llava.flops_per_sample (used only when ../shared/bench is absent)."""
    v, t = cfg.vision_config, cfg.text_config
    T = IMAGE_TOKENS + text_len
    vt = IMAGE_TOKENS + 1
    v_lin = v.num_hidden_layers * (4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size)
    v_fwd = 2 * v_lin * vt + 4 * v.num_hidden_layers * vt * vt * v.hidden_size
    kv = t.num_key_value_heads * (t.hidden_size // t.num_attention_heads)
    l_lin = t.num_hidden_layers * (2 * t.hidden_size**2 + 2 * t.hidden_size * kv
                                   + 3 * t.hidden_size * t.intermediate_size)
    l_fwd = 2 * (l_lin + t.hidden_size * t.vocab_size) * T + 2 * t.num_hidden_layers * T * T * t.hidden_size
    proj = 2 * (v.hidden_size * t.hidden_size + t.hidden_size**2) * IMAGE_TOKENS
    if stage == 1:
        return v_fwd + 2 * l_fwd + 3 * proj
    return v_fwd + 3 * l_fwd + 3 * proj


text_lengths, flops_per_sample, SOURCE = _text_lengths, _flops_per_sample, "own copy"
if (BENCH / "workload.py").exists() and (BENCH / "peer_hf_llava.py").exists():
    sys.path.insert(0, str(BENCH))
    from peer_hf_llava import flops_per_sample  # noqa: E402,F811
    from workload import IMAGE_TOKENS, text_lengths  # noqa: E402,F811

    SOURCE = str(BENCH)

