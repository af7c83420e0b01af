"""Shared test helpers: random CLIP weights of any shape, made fp16-representable so that a reference that
rounds weights to fp16 (OpenAI's and open_clip's build_model do) sees exactly the same numbers."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the labelled-set scoring
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

import clip_model  # noqa: E402

VIT_B_16 = clip_model.CLIPConfig()
# A small configuration with the same structure (head dim 64) for fast tests.
TINY = clip_model.CLIPConfig(embed_dim=64, image_resolution=64, vision_layers=8, vision_width=128, vision_patch_size=16,
                             context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2,
                             transformer_layers=2)


def weight_shapes(cfg):
    """{key: shape} of the CLIP state dict for cfg, without allocating weights."""
    with torch.device("meta"):
        model = clip_model.CLIP(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def random_state_dict(cfg, seed=0):
    """Random weights with sensible scales (activations stay O(1) through the layers); LayerNorm affines and
    biases are non-trivial so that a swapped or dropped parameter shows up. Values are fp16-representable."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in weight_shapes(cfg).items():
        if k == "logit_scale":
            t = torch.tensor(100.0).log()
        elif ("ln_" in k or k.endswith("ln_final.weight")) and k.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith("bias") or "embedding" in k:
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if k.endswith("weight") and len(shape) == 2 else shape[0]
            if k == "visual.conv1.weight":
                fan_in = shape[1] * shape[2] * shape[3]
            t = torch.randn(shape, generator=g) * fan_in ** -0.5
        sd[k] = t.half().float()
    return sd


@pytest.fixture(scope="session")
def tiny_state_dict():
    return random_state_dict(TINY, seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_state_dict):
    return clip_model.build_model(tiny_state_dict)


@pytest.fixture(scope="session")
def vitb16_state_dict():
    return random_state_dict(VIT_B_16, seed=0)


def shared_lines(name):
    """Lines of a file in ../shared/benchmarks, or skip the test when the folder is absent."""
    path = os.path.join(SHARED, "benchmarks", name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()
