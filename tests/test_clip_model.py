"""clip_model.py against independent references: open_clip (the model and the tokenizer), timm's positional
embedding resampling, a direct transcription of the CLIP Surgery equations (SPEC section 2), hand-known facts
of OpenAI's release (key count, parameter count, vocab checksum), and every documented error path."""
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clip_model
from conftest import ROOT, TINY, VIT_B_16, shared_lines, weight_shapes

open_clip = pytest.importorskip("open_clip")


def reference_model(sd):
    """open_clip's builder for OpenAI state dicts (QuickGELU, fp16 cast), back to fp32 for comparison."""
    return open_clip.model.build_model_from_openai_state_dict(dict(sd)).float().eval()


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------- release facts

def test_vocab_file_checksum():
    with open(clip_model.BPE_PATH, "rb") as f:
        data = f.read()
    assert len(data) == 1356917
    assert hashlib.sha256(data).hexdigest() == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def test_vitb16_keys_and_parameter_count():
    shapes = weight_shapes(VIT_B_16)
    assert len(shapes) == 302
    assert sum(math.prod(s) for s in shapes.values()) == 149_620_737
    assert shapes["visual.positional_embedding"] == (197, 768)
    assert shapes["visual.transformer.resblocks.11.attn.in_proj_weight"] == (2304, 768)
    assert shapes["transformer.resblocks.0.mlp.c_proj.weight"] == (512, 2048)


@pytest.mark.parametrize("cfg", [
    # B/32, B/16, L/14 as released by OpenAI, and the tiny test shape
    clip_model.CLIPConfig(vision_patch_size=32),
    VIT_B_16,
    clip_model.CLIPConfig(embed_dim=768, vision_layers=24, vision_width=1024, vision_patch_size=14,
                          transformer_width=768, transformer_heads=12),
    TINY,
])
def test_config_inferred_from_shapes(cfg):
    with torch.device("meta"):
        sd = clip_model.CLIP(cfg).state_dict()
    assert clip_model.config_from_state_dict(sd) == cfg


# ---------------------------------------------------------------------------------------------- tokenizer

TOKENIZER_CASES = [
    "", " ", "a photo of a cat.", "A Photo Of A CAT!!!", "  lots   of \t white\nspace  ",
    "naïve café résumé, Straße, Ελληνικά, русский текст, 日本語のテキスト, 中文, 한국어",
    "emoji 🐶🐱🚀 and flags 🇫🇷 and skin tones 👍🏽", "HTML &amp; entities &lt;b&gt; &amp;amp; &quot;quoted&quot; &#39;x&#39;",
    "triple &amp;amp;amp; escaped", "<b>tags</b> &amp;amp;amp; with markup",
    "numbers 3.14159 1,000,000 2024-01-01 12:30pm 1st 2nd 42nd", "it's they're we've I'm you'll he'd don't CAN'T",
    "mojibake: Ã©tÃ© â€œquotesâ€\x9d", "<PERSON> walks with <PERSON> in <LOCATION>", "a" * 300,
    " ".join(["word"] * 100), "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "punctuation!?...---;;;:::@@@###$$$%%%^^^&&&***((()))", "tab\tseparated\tvalues\r\nwindows line",
    "zero\u200bwidth\u00a0nbsp", "Mixed CASE with ÀÉÎÕÜ accents",
]


def test_tokenizer_matches_open_clip_on_varied_text():
    ours = clip_model.tokenize(TOKENIZER_CASES)
    ref = open_clip.tokenizer.tokenize(TOKENIZER_CASES)
    assert ours.dtype == torch.long and ours.shape == (len(TOKENIZER_CASES), 77)
    for i, text in enumerate(TOKENIZER_CASES):
        assert ours[i].tolist() == ref[i].tolist(), text


@pytest.mark.parametrize("name", ["cc_captions.txt", "coco_captions.txt"])
def test_tokenizer_matches_open_clip_on_real_captions(name):
    captions = shared_lines(name)
    assert torch.equal(clip_model.tokenize(captions), open_clip.tokenizer.tokenize(captions).long())


def test_tokenizer_truncation_and_known_ids():
    tok = clip_model.get_tokenizer()
    assert (tok.sot_token, tok.eot_token) == (49406, 49407)
    long = clip_model.tokenize("word " * 200)[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long > 0).all()
    with pytest.raises(RuntimeError, match="context length"):
        clip_model.tokenize("word " * 200, truncate=False)
    empty = clip_model.tokenize("")[0]
    assert empty[:2].tolist() == [49406, 49407] and not empty[2:].any()
    ids = tok.encode("a photo of a dog.")
    assert tok.decode(ids).strip() == "a photo of a dog ."
    # The special tokens in text are recognised as such by OpenAI's pre-tokenisation pattern.
    assert tok.encode("<|startoftext|>") == [49406]


# ---------------------------------------------------------------------------------------------- parity with open_clip

def test_parity_with_open_clip_vitb16(vitb16_state_dict):
    """Identical random weights of the real ViT-B/16 shapes: image and text embeddings agree to 1e-4 in fp32."""
    ours = clip_model.build_model(vitb16_state_dict)
    ref = reference_model(vitb16_state_dict)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    texts = clip_model.tokenize(["a photo of a brown dog", "an emoji 🐱 and &amp; html, numbers 123"])
    with torch.no_grad():
        img_o, img_r = ours.encode_image(images), ref.encode_image(images)
        txt_o, txt_r = ours.encode_text(texts), ref.encode_text(texts)
        logits_o, _ = ours(images, texts)
        logits_r, _, = ref(images, texts)[:2]
    assert img_r.abs().max() > 0.1 and txt_r.abs().max() > 0.1  # non-trivial outputs
    assert max_diff(img_o, img_r) <= 1e-4
    assert max_diff(txt_o, txt_r) <= 1e-4
    assert max_diff(ours.logit_scale.exp(), ref.logit_scale.exp()) < 1e-4
    probs_r = (100 * F.normalize(img_r, dim=-1) @ F.normalize(txt_r, dim=-1).t())
    assert max_diff(logits_o, probs_r) < 1e-3


class _Holder(nn.Module):
    """A module tree holding given tensors under dotted names, traced into a TorchScript archive like OpenAI's."""

    def __init__(self, sd):
        super().__init__()
        for key, value in sd.items():
            *path, leaf = key.split(".")
            module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))

    def forward(self, x):
        return x + sum(p.float().sum() for p in self.parameters())


def test_torchscript_archive_path(tmp_path, tiny_state_dict):
    """An fp16 TorchScript archive (the release format) loads through load() and matches the reference."""
    sd16 = {k: v.half() for k, v in tiny_state_dict.items()}
    path = tmp_path / "scripted.pt"
    torch.jit.trace(_Holder(sd16), torch.zeros(1)).save(str(path))
    ours = clip_model.load(str(path))
    ref = reference_model(tiny_state_dict)
    images = torch.randn(2, 3, 64, 64)
    texts = clip_model.tokenize(["a cat", "two dogs on grass"])
    with torch.no_grad():
        assert max_diff(ours.encode_image(images), ref.encode_image(images)) <= 1e-4
        assert max_diff(ours.encode_text(texts), ref.encode_text(texts)) <= 1e-4
    assert all(p.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.slow  # ~30 s; the format is covered by the tiny archive above, the B/16 shapes by the parity test
def test_torchscript_archive_path_vitb16(tmp_path, vitb16_state_dict):
    """The same through a TorchScript archive with the real ViT-B/16 shapes."""
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.trace(_Holder({k: v.half() for k, v in vitb16_state_dict.items()}), torch.zeros(1)).save(str(path))
    ours = clip_model.load(str(path))
    ref = reference_model(vitb16_state_dict)
    images = torch.randn(1, 3, 224, 224)
    texts = clip_model.tokenize(["a photo of a cat"])
    with torch.no_grad():
        assert max_diff(ours.encode_image(images), ref.encode_image(images)) <= 1e-4
        assert max_diff(ours.encode_text(texts), ref.encode_text(texts)) <= 1e-4


def test_plain_and_open_clip_checkpoint_formats(tmp_path, tiny_state_dict, tiny_model):
    """The same (QuickGELU) weights as a plain state dict, an open_clip training checkpoint and a .safetensors
    file load to the same model; the activation comes from the flag or the path, never silently."""
    from safetensors.torch import save_file  # the reference writer of the format our reader parses by hand
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = tiny_model.encode_image(images)
    plain = dict(tiny_state_dict, input_resolution=64, context_length=77, vocab_size=49408)
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v.half() for k, v in tiny_state_dict.items()}}
    torch.save(plain, tmp_path / "plain.pt")
    torch.save(wrapped, tmp_path / "epoch_3-quickgelu.pt")
    # an open_clip training checkpoint whose run name holds the model name; logit_bias (unused here) is dropped
    named = {"epoch": 3, "name": "2024_05_01-model_ViT-B-32-quickgelu-lr_0.0005-b_256",
             "state_dict": {**wrapped["state_dict"], "module.logit_bias": torch.tensor(-10.0)}}
    torch.save(named, tmp_path / "epoch_3.pt")
    save_file({k: v.half().contiguous() for k, v in tiny_state_dict.items()}, str(tmp_path / "model.safetensors"))
    for name, flag, why in [("plain.pt", True, "as asked"), ("epoch_3-quickgelu.pt", None, "'quickgelu' in its name"),
                            ("model.safetensors", True, "as asked"), ("epoch_3.pt", None, "'quickgelu' in its name")]:
        model = clip_model.load(str(tmp_path / name), quick_gelu=flag)
        assert model.activation == f"QuickGELU ({why})"
        with torch.no_grad():
            assert torch.equal(model.encode_image(images), expected), name
    # no flag and no hint: exact GELU (open_clip's default), said so, and the features differ
    model = clip_model.load(str(tmp_path / "plain.pt"))
    assert model.activation.startswith("GELU (a state dict with no QuickGELU hint in its name")
    assert "GELU (a state dict" in clip_model.describe(model)
    with torch.no_grad():
        assert max_diff(model.encode_image(images), expected) > 1e-3


def test_safetensors_reader_matches_the_library(tmp_path):
    """Every dtype open_clip files use, odd shapes, a scalar and an empty tensor, against safetensors' own loader."""
    from safetensors.torch import load_file, save_file
    g = torch.Generator().manual_seed(0)
    tensors = {"a.f32": torch.randn(3, 5, generator=g), "b.f16": torch.randn(7, generator=g).half(),
               "c.bf16": torch.randn(2, 2, 3, generator=g).bfloat16(), "d.i64": torch.arange(-3, 9),
               "scalar": torch.tensor(4.5), "empty": torch.zeros(0, 4), "flag": torch.tensor([True, False])}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    ours, ref = clip_model.read_safetensors(str(tmp_path / "t.safetensors")), load_file(str(tmp_path / "t.safetensors"))
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape and torch.equal(ours[k], ref[k]), k


# ---------------------------------------------------------------------------------------------- other backbones

def open_clip_model(cfg, quick_gelu):
    """open_clip's own CLIP class (not its OpenAI-state-dict builder) for a CLIPConfig: an independent build of the
    architecture, with the activation and vision head width set the way open_clip's model configs set them."""
    vision = dict(layers=cfg.vision_layers, width=cfg.vision_width, head_width=cfg.vision_head_width,
                  mlp_ratio=(cfg.vision_mlp_width or 4 * cfg.vision_width) / cfg.vision_width,
                  patch_size=cfg.vision_patch_size, image_size=cfg.image_resolution)
    text = dict(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.transformer_width,
                heads=cfg.transformer_heads, layers=cfg.transformer_layers)
    return open_clip.model.CLIP(cfg.embed_dim, vision, text, quick_gelu=quick_gelu).eval()


BACKBONES = {  # OpenAI's B/32 at full depth (and 3 blocks); L/14 and L/14@336 at full width, 2 of 24 blocks; H/14
    "B-32": clip_model.CLIPConfig(vision_patch_size=32),
    "B-32-3": clip_model.CLIPConfig(vision_patch_size=32, vision_layers=3, transformer_layers=3),
    "L-14": clip_model.CLIPConfig(embed_dim=768, vision_layers=2, vision_width=1024, vision_patch_size=14,
                                  transformer_width=768, transformer_heads=12, transformer_layers=2),
    "L-14-336": clip_model.CLIPConfig(embed_dim=768, image_resolution=336, vision_layers=2, vision_width=1024,
                                      vision_patch_size=14, transformer_width=768, transformer_heads=12,
                                      transformer_layers=2),
    "H-14": clip_model.CLIPConfig(embed_dim=1024, vision_layers=1, vision_width=1280, vision_patch_size=14,
                                  vision_head_width=80, transformer_width=1024, transformer_heads=16,
                                  transformer_layers=1),
}


@pytest.mark.parametrize("name,act,file", [
    ("B-32", "gelu", "ViT-B-32-laion2b_s34b_b79k.pt"),         # LAION B/32: exact GELU, open_clip checkpoint
    ("B-32-3", "quickgelu", "ViT-B-32-quickgelu-metaclip_400m.pt"),  # MetaCLIP: QuickGELU, from the file name
    ("L-14", "gelu", "datacomp_xl_s13b_b90k/open_clip_model.safetensors"),  # DataComp L/14 as on the hub
    ("L-14-336", "quickgelu",  # OpenAI's L/14@336 as the hub's timm repo ships it: QuickGELU from the cache folder
     "models--timm--vit_large_patch14_clip_336.openai/snapshots/0a1b/open_clip_pytorch_model.bin"),
    ("H-14", "gelu", "laion2b_s32b_b79k/open_clip_pytorch_model.bin"),  # 16 heads of 80: not inferable from shapes
])
def test_parity_with_open_clip_other_backbones(tmp_path, name, act, file):
    """Random weights in open_clip's own model of each shape, saved as open_clip publishes them (training
    checkpoint, .bin or .safetensors), loaded by path with the activation decided from the path: image and text
    embeddings agree to 1e-4. The wrong activation is visibly wrong (so the test can tell them apart)."""
    from conftest import random_state_dict
    from safetensors.torch import save_file
    cfg = BACKBONES[name]
    sd = random_state_dict(cfg, seed=3)
    ref = open_clip_model(cfg, quick_gelu=act == "quickgelu")
    ref.load_state_dict(sd, strict=True)  # same key names: open_clip keeps OpenAI's
    path = tmp_path / file
    path.parent.mkdir(parents=True, exist_ok=True)
    if file.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    elif file.endswith(".bin"):
        torch.save(ref.state_dict(), path)
    else:
        torch.save({"epoch": 32, "name": name, "state_dict": {"module." + k: v for k, v in ref.state_dict().items()}},
                   path)
    ours = clip_model.load(str(path))
    assert ours.activation.startswith("QuickGELU" if act == "quickgelu" else "GELU")
    assert ours.cfg == dataclasses.replace(cfg, quick_gelu=act == "quickgelu")
    torch.manual_seed(0)
    images = torch.randn(2, 3, cfg.image_resolution, cfg.image_resolution)
    texts = clip_model.tokenize(["a photo of a brown dog", "two cats on a sofa"])
    with torch.no_grad():
        img_o, img_r = ours.encode_image(images), ref.encode_image(images)
        txt_o, txt_r = ours.encode_text(texts), ref.encode_text(texts)
        wrong = clip_model.build_model(sd, quick_gelu=act != "quickgelu").encode_image(images)
    assert img_r.abs().max() > 0.1 and txt_r.abs().max() > 0.1
    assert max_diff(img_o, img_r) <= 1e-4 and max_diff(txt_o, txt_r) <= 1e-4
    assert max_diff(wrong, img_r) > 1e-3


def test_openai_model_names_and_activation_rules(tmp_path):
    """The four OpenAI ViTs by name, each URL carrying its file's SHA-256; activation order: flag, TorchScript,
    open_clip_config.json beside the file, a hint in the file name or hub cache folder, else GELU. The user's own
    folder names are not hints."""
    assert sorted(clip_model.MODELS) == ["ViT-B/16", "ViT-B/32", "ViT-L/14", "ViT-L/14@336px"]
    for name, url in clip_model.MODELS.items():
        digest, file = url.split("/")[-2:]
        assert len(digest) == 64 and int(digest, 16) >= 0 and file == name.replace("/", "-").replace("@", "-") + ".pt"

    def saved(rel):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"x": torch.zeros(1)}, path)
        return str(path)
    assert clip_model.activation_for(saved("openai_runs/weights.pt"))[0] is False  # a user's folder: no hint
    assert clip_model.activation_for(saved("ViT-L-14-openai.pt")) == (True, "'openai' in its name")
    hub = saved("models--timm--vit_base_patch32_clip_224.metaclip_400m/snapshots/0a1b/open_clip_pytorch_model.bin")
    assert clip_model.activation_for(hub) == (True, "'metaclip' in its name")
    assert clip_model.activation_for(hub, quick_gelu=False) == (False, "as asked")
    laion = saved("models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K/snapshots/0a1b/open_clip_pytorch_model.bin")
    assert clip_model.activation_for(laion)[0] is False
    for cfg, quick in [({"model_cfg": {"embed_dim": 512, "quick_gelu": True}}, True),
                       ({"model_cfg": {"embed_dim": 512, "quick_gelu": False}}, False)]:
        (tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K/snapshots/0a1b/open_clip_config.json").write_text(
            json.dumps(cfg))
        assert clip_model.activation_for(laion) == (quick, "open_clip_config.json beside it")
    # a config without the key (older snapshots of QuickGELU repos) is no answer: the names decide
    (tmp_path / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K/snapshots/0a1b/open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"embed_dim": 512}}))
    assert clip_model.activation_for(laion) == (
        False, "open_clip_config.json beside it names no quick_gelu: open_clip's default, GELU")
    (tmp_path / "models--timm--vit_base_patch32_clip_224.metaclip_400m/snapshots/0a1b/open_clip_config.json"
     ).write_text(json.dumps({"model_cfg": {"embed_dim": 512}}))
    assert clip_model.activation_for(hub) == (True, "'metaclip' in its name")
    assert clip_model.activation_for(saved("elsewhere/weights.pt"), names=["https://host/x-quickgelu/w.pt"]) == (
        True, "'quickgelu' in its name")
    scripted = tmp_path / "any-name.pt"
    torch.jit.trace(_Holder({"x": torch.zeros(1)}), torch.zeros(1)).save(str(scripted))
    assert clip_model.activation_for(str(scripted)) == (True, "OpenAI's TorchScript release")


def test_surgery_defaults_to_the_last_half_of_the_blocks():
    """6 of ViT-B's 12 blocks (the authors' setting), 12 of ViT-L's 24: checked on an L/14-shaped tower of 4 blocks."""
    from conftest import random_state_dict
    cfg = dataclasses.replace(BACKBONES["L-14"], vision_layers=4)
    model = clip_model.build_model(random_state_dict(cfg, seed=5))
    x = torch.randn(1, 3, 56, 84)
    with torch.no_grad():
        default, grid = model.visual.forward_surgery(x)
        half, _ = model.visual.forward_surgery(x, 2)
        three, _ = model.visual.forward_surgery(x, 3)
    assert grid == (4, 6) and torch.equal(default, half) and max_diff(default, three) > 1e-3


# ---------------------------------------------------------------------------------------------- dense path and surgery

def transcribed_surgery(sd, image, n_surgery, patch=16):
    """SPEC section 2 written out with raw tensors, independent of clip_model's modules."""
    W = sd["visual.conv1.weight"].shape[0]
    heads = W // 64
    layers = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})

    def ln(x, p):
        return F.layer_norm(x, (W,), sd[p + ".weight"], sd[p + ".bias"], 1e-5)

    def attn_parts(x, p):
        qkv = x @ sd[p + "attn.in_proj_weight"].t() + sd[p + "attn.in_proj_bias"]
        q, k, v = qkv.split(W, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, 64).transpose(1, 2)
        return split(q), split(k), split(v)

    def attend(a, b, v, p):
        w = torch.softmax(a @ b.transpose(-1, -2) / 8.0, dim=-1)  # 1/sqrt(64)
        o = (w @ v).transpose(1, 2).reshape(v.shape[0], -1, W)
        return o @ sd[p + "attn.out_proj.weight"].t() + sd[p + "attn.out_proj.bias"]

    def mlp(x, p):
        h = x @ sd[p + "mlp.c_fc.weight"].t() + sd[p + "mlp.c_fc.bias"]
        h = h * torch.sigmoid(1.702 * h)
        return h @ sd[p + "mlp.c_proj.weight"].t() + sd[p + "mlp.c_proj.bias"]

    B, _, H, Wd = image.shape
    h, w = H // patch, Wd // patch
    x = F.conv2d(image, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    pe = sd["visual.positional_embedding"]
    g = int(round(math.sqrt(pe.shape[0] - 1)))
    grid = pe[1:].reshape(g, g, W).permute(2, 0, 1)[None]
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0].permute(1, 2, 0).reshape(h * w, W)
    x = torch.cat([sd["visual.class_embedding"].expand(B, 1, W), x], 1) + torch.cat([pe[:1], grid])
    x = ln(x, "visual.ln_pre")
    x_ori = x_new = None
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        if i < layers - n_surgery:
            q, k, v = attn_parts(ln(x, p + "ln_1"), p)
            x = x + attend(q, k, v, p)
            x = x + mlp(ln(x, p + "ln_2"), p)
            continue
        src = x if x_ori is None else x_ori
        q, k, v = attn_parts(ln(src, p + "ln_1"), p)
        a_vv, a_ori = attend(v, v, v, p), attend(q, k, v, p)
        x_new = (x if x_new is None else x_new) + a_vv
        x_ori = src + a_ori
        x_ori = x_ori + mlp(ln(x_ori, p + "ln_2"), p)
    if n_surgery == 0:
        return x
    return torch.cat([x_ori[:, :1], x_new[:, 1:]], 1)


@pytest.mark.parametrize("n_surgery,size", [(6, (64, 64)), (6, (48, 80)), (3, (96, 32)), (8, (32, 32)), (1, (64, 48))])
def test_surgery_matches_transcription(tiny_model, tiny_state_dict, n_surgery, size):
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours, grid = tiny_model.visual.forward_surgery(image, surgery_layers=n_surgery)
    ref = transcribed_surgery(tiny_state_dict, image, n_surgery)
    assert grid == (size[0] // 16, size[1] // 16)
    assert ours.shape == ref.shape == (2, 1 + grid[0] * grid[1], 128)
    assert max_diff(ours, ref) < 1e-4


def test_surgery_matches_transcription_vitb16(vitb16_state_dict):
    model = clip_model.build_model(vitb16_state_dict)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours, _ = model.visual.forward_surgery(image)  # default N = 6
    assert max_diff(ours, transcribed_surgery(vitb16_state_dict, image, 6)) < 1e-4


def test_surgery_zero_is_plain_model(tiny_model):
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense, _ = tiny_model.visual.forward_surgery(image, surgery_layers=0)
        tokens, _ = tiny_model.visual.embed(image)
        plain = tiny_model.visual.transformer(tokens)
        assert torch.equal(dense, plain)
        # the CLS token through the frozen head is the plain image embedding
        assert torch.allclose(tiny_model.visual.head(dense[:, 0]), tiny_model.encode_image(image), atol=1e-6)
        # surgery keeps x_ori intact: its CLS equals the plain model's CLS for any N
        dense6, _ = tiny_model.visual.forward_surgery(image, surgery_layers=6)
        assert torch.allclose(dense6[:, 0], plain[:, 0], atol=1e-5)


def test_positional_embedding_interpolation_matches_timm(tiny_model):
    timm_pos = pytest.importorskip("timm.layers").resample_abs_pos_embed
    vis = tiny_model.visual
    before = vis.positional_embedding.detach().clone()
    for h, w in [(8, 8), (3, 5), (7, 2), (4, 4)]:
        ours = vis.positional_embedding_for(h, w)
        ref = timm_pos(before[None], (h, w), num_prefix_tokens=1, interpolation="bicubic", antialias=False)[0]
        assert ours.shape == (1 + h * w, 128)
        assert max_diff(ours, ref) < 1e-5
    assert vis.positional_embedding_for(4, 4) is vis.positional_embedding  # native grid: untouched parameter
    assert torch.equal(vis.positional_embedding, before)


def test_dense_tokens_at_448_through_frozen_head(tiny_model):
    with torch.no_grad():
        x, (h, w) = tiny_model.visual.forward_surgery(torch.randn(1, 3, 448, 448))
        assert (h, w) == (28, 28) and x.shape == (1, 785, 128)
        feats = tiny_model.visual.head(x[:, 1:])  # (1, 784, embed_dim)
        ref = F.layer_norm(x[:, 1:], (128,), tiny_model.visual.ln_post.weight, tiny_model.visual.ln_post.bias) @ tiny_model.visual.proj
        assert feats.shape == (1, 784, 64) and max_diff(feats, ref) < 1e-5


def test_half_precision_forward_keeps_layernorm_in_fp32(tiny_model):
    model = clip_model.build_model({k: v for k, v in tiny_model.state_dict().items()})
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.encode_image(image)
        half = model.to(torch.bfloat16).encode_image(image.bfloat16())
    assert half.dtype == torch.bfloat16
    assert F.cosine_similarity(half.float(), ref).item() > 0.99


# ---------------------------------------------------------------------------------------------- bad input

def test_wrong_image_size_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        tiny_model.encode_image(torch.randn(1, 3, 65, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_model.encode_image(torch.randn(3, 64, 64))


def test_missing_and_corrupt_checkpoints(tmp_path, tiny_state_dict):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        clip_model.load(str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError, match=r"model names \['ViT-B/16', 'ViT-B/32', 'ViT-L/14', 'ViT-L/14@336px'\]"):
        clip_model.load("ViT-H/14")  # not an OpenAI release: a path, which does not exist
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        clip_model.load(str(junk))
    good = tmp_path / "good.pt"
    torch.save(tiny_state_dict, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="corrupt or truncated"):
        clip_model.load(str(truncated))


def test_unknown_missing_and_misshaped_keys(tiny_state_dict):
    with pytest.raises(ValueError, match=r"unknown keys \(1\).*visual.extra"):
        clip_model.build_model(dict(tiny_state_dict, **{"visual.extra": torch.zeros(1)}))
    sd = dict(tiny_state_dict)
    del sd["visual.ln_post.bias"]
    with pytest.raises(ValueError, match=r"missing keys \(1\).*ln_post.bias"):
        clip_model.build_model(sd)
    with pytest.raises(ValueError, match=r"wrong shapes.*visual.proj"):
        clip_model.build_model(dict(tiny_state_dict, **{"visual.proj": torch.zeros(128, 65)}))
    with pytest.raises(ValueError, match="ResNet"):
        clip_model.build_model({"visual.layer1.0.conv1.weight": torch.zeros(1)})


def test_download_offline_fails_with_one_clear_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(clip_model.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError) as err:
        clip_model.download("ViT-B/16", root=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "by hand" in message and str(tmp_path / "ViT-B-16.pt") in message
    assert not list(tmp_path.iterdir())  # no partial file left behind
    with pytest.raises(ValueError, match="unknown model"):
        clip_model.download("ViT-H/99", root=str(tmp_path))


def test_download_checks_sha256_and_caches(tmp_path):
    payload = b"pretend weights"
    sha = hashlib.sha256(payload).hexdigest()
    src = tmp_path / "remote" / sha
    src.mkdir(parents=True)
    (src / "model.pt").write_bytes(payload)
    cache = tmp_path / "cache"
    path = clip_model.download((src / "model.pt").as_uri(), root=str(cache))
    assert open(path, "rb").read() == payload
    (src / "model.pt").write_bytes(b"changed upstream")  # the cached, verified copy is reused
    assert clip_model.download((src / "model.pt").as_uri(), root=str(cache)) == path
    bad = tmp_path / "remote" / ("0" * 64)
    bad.mkdir()
    (bad / "other.pt").write_bytes(payload)
    with pytest.raises(RuntimeError, match="does not match its SHA-256"):
        clip_model.download((bad / "other.pt").as_uri(), root=str(cache))
    assert not (cache / "other.pt").exists() and not (cache / "other.pt.part").exists()


def test_download_of_a_url_without_sha256(tmp_path, capsys):
    """Another site's URL (no SHA-256 in it) downloads unverified, saying so, and two repos' files of the same
    name (the hub's open_clip_pytorch_model.bin) are cached apart; the URL is a name for the activation."""
    from conftest import TINY, random_state_dict
    cache, sources = tmp_path / "cache", []
    for seed, repo in enumerate(("laion--ViT-B-32/resolve/main", "timm--vit_b32.metaclip_400m/resolve/main")):
        src = tmp_path / "hub" / repo
        src.mkdir(parents=True)
        torch.save(random_state_dict(TINY, seed=seed), src / "open_clip_pytorch_model.bin")
        sources.append((src / "open_clip_pytorch_model.bin").as_uri())
    paths = [clip_model.download(url, root=str(cache)) for url in sources]
    assert paths[0] != paths[1] and "not verified" in capsys.readouterr().err
    assert [torch.load(p)["positional_embedding"].sum().item() for p in paths] == [
        random_state_dict(TINY, seed=s)["positional_embedding"].sum().item() for s in (0, 1)]
    assert clip_model.download(sources[1], root=str(cache)) == paths[1]  # cached
    assert clip_model.load(sources[0], root=str(cache)).activation.startswith("GELU (a state dict with no QuickGELU")
    assert clip_model.load(sources[1], root=str(cache)).activation == "QuickGELU ('metaclip' in its name)"
    # of a URL only the file name and a hub repo are names: not the user's folders, not a query
    assert clip_model.url_names("file:///home/me/openai_runs/laion.bin") == ["laion.bin"]
    assert clip_model.url_names("https://huggingface.co/timm/vit_b16.openai/resolve/main/open_clip_model.safetensors"
                                "?download=true") == ["open_clip_model.safetensors", "timm/vit_b16.openai"]
    hub = tmp_path / "hub" / "laion--ViT-B-32/resolve/main"  # (urllib's file: handler takes '?...' as the name)
    (hub / "open_clip_pytorch_model.bin?download=true").write_bytes((hub / "open_clip_pytorch_model.bin").read_bytes())
    path = clip_model.download(sources[0] + "?download=true", root=str(cache))
    assert path.endswith(os.sep + "open_clip_pytorch_model.bin") and path not in paths


# ---------------------------------------------------------------------------------------------- command line

def test_command_line_zero_shot(tmp_path, tiny_state_dict):
    torch.save(tiny_state_dict, tmp_path / "tiny.pt")
    PIL = pytest.importorskip("PIL.Image")
    PIL.new("RGB", (100, 80), (10, 200, 30)).save(tmp_path / "img.png")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "clip_model.py"), "--checkpoint", str(tmp_path / "tiny.pt"),
                          "--image", str(tmp_path / "img.png"), "--texts", "a dog, a cat,a tree"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3 and {l.split(None, 1)[1] for l in lines} == {"a dog", "a cat", "a tree"}
    assert abs(sum(float(l.split("%")[0]) for l in lines) - 100) < 0.1
    run = subprocess.run([sys.executable, os.path.join(ROOT, "clip_model.py"), "--checkpoint", str(tmp_path / "tiny.pt"),
                          "--image", str(tmp_path / "missing.png")], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "cannot open image" in run.stderr and "Traceback" not in run.stderr
