"""
CLIP ViT (OpenAI weights) written out by hand, with the CLIP Surgery dense path that TagAlign uses.

Run it:
    python clip_model.py  # built-in test picture, zero-shot probabilities
    python clip_model.py --image photo.jpg --texts "a dog,a cat"
    python clip_model.py --image photo.jpg --texts "a dog,a cat" --checkpoint /path/to/ViT-B-16.pt
    python clip_model.py --checkpoint ViT-L/14@336px  # OpenAI's ViT-B/32, B/16, L/14, L/14@336px
    python clip_model.py --checkpoint open_clip_model.safetensors --clip-act gelu
        # open_clip (LAION, DataComp)

What is in here (paper references are to arXiv 2312.14149 unless said otherwise):
- The CLIP ViT image encoder and causal text transformer of Radford et al. 2021, with OpenAI's
  parameter names so that the released checkpoints load by identity (`build_model`, `load`):
  OpenAI's ViT-B/32, B/16, L/14 and L/14@336px by name, open_clip files (LAION, DataComp, MetaCLIP;
  .pt, .bin or .safetensors) by path. Their activation (QuickGELU or GELU) is not in the weights:
  `activation_for` decides it and says why.
- The byte-level BPE tokenizer (`SimpleTokenizer`, `tokenize`), identical ids to OpenAI's.
- Dense features at any input size (a multiple of the patch size) with bicubic positional-embedding
  interpolation computed on the fly.
- CLIP Surgery's dual path (Li et al. 2023) as TagAlign wires it (docs/method.md): in the last N
  blocks a second residual stream x_new accumulates v-v attention softmax(v v^T / sqrt(d)) v, while
  the original stream x_ori runs unchanged; the 768-d x_new patch tokens before ln_post are
  TagAlign's dense input (Sec. 3.2).
"""
import argparse
import contextlib
import gzip
import hashlib
import html
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from functools import lru_cache

import ftfy
import regex
import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
BPE_PATH = os.path.join(HERE, "data", "bpe_simple_vocab_16e6.txt.gz")
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# TagAlign trains/evaluates with these
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OPENAI_URL = "https://openaipublic.azureedge.net/clip/models/"
MODELS = {  # OpenAI's ViT releases; the SHA-256 of each file is the second-to-last part of its URL
    "ViT-B/32": OPENAI_URL + "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
                             "/ViT-B-32.pt",
    "ViT-B/16": OPENAI_URL + "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"
                             "/ViT-B-16.pt",
    "ViT-L/14": OPENAI_URL + "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
                             "/ViT-L-14.pt",
    "ViT-L/14@336px":
        OPENAI_URL + "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"
                     "/ViT-L-14-336px.pt",
}
# Vision head width of open_clip's wide towers (ViT-H/14, ViT-g/14, ViT-bigG/14): their heads are
# not 64 wide, and a state dict does not show the head count (in_proj_weight is (3C, C) whatever it
# is). Every other width: 64.
VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
# --clip-act values of every command -> load()'s quick_gelu (None: decided from the file,
# `activation_for`).
ACTIVATIONS = {"auto": None, "quickgelu": True, "gelu": False}
ACTIVATION_HELP = ("CLIP's MLP activation, which the weights do not reveal: auto = QuickGELU for "
                   "OpenAI's releases, else what open_clip_config.json beside the file says, else "
                   "QuickGELU when the file name says quickgelu/openai/metaclip, else exact GELU "
                   "(open_clip's LAION, DataComp)")
# Path hints for QuickGELU in a file that is not OpenAI's TorchScript release (see
# `activation_for`).
QUICK_GELU_HINTS = ("quickgelu", "openai", "metaclip")
# Entries dropped on load: OpenAI's TorchScript non-weights, and open_clip's logit_bias (a
# SigLIP-style loss term some CLIP-class checkpoints carry; it shifts contrastive logits only, never
# a feature).
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "logit_bias")


# --------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE (Sennrich et al. 2016 on UTF-8 bytes, as in GPT-2), with OpenAI's
# cleaning.

@lru_cache()
def bytes_to_unicode():
    """Map each of the 256 bytes to a printable unicode character, so BPE works on strings without
    whitespace/control characters. Printable latin-1 bytes map to themselves, the rest to 256+."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    others = [b for b in range(256) if b not in keep]
    # Order matters: the vocabulary lists the printable bytes first, then the others (ids 0..255).
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clean_text(text):
    """OpenAI's cleaning: fix mojibake, unescape HTML (twice, for double-escaped text), collapse
    whitespace, lower case."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    SOT, EOT = "<|startoftext|>", "<|endoftext|>"

    def __init__(self, bpe_path=BPE_PATH):
        if not os.path.exists(bpe_path):
            raise FileNotFoundError(f"BPE vocabulary not found at {bpe_path}; it ships in the "
                                    "repository's data/ folder "
                                    "(see README: data/bpe_simple_vocab_16e6.txt.gz)")
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
        # lines 1..48894; line 0 is a header
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = (symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
                 + [self.SOT, self.EOT])
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.merge_rank = {m: i for i, m in enumerate(merges)}
        self.sot_token, self.eot_token = self.encoder[self.SOT], self.encoder[self.EOT]
        self.cache = {self.SOT: self.SOT, self.EOT: self.EOT}
        self.pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|"""
                                     r"""'s|'t|'re|'ve|'m|'ll|'d|"""
                                     r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)

    def bpe(self, token):
        """Greedily apply the lowest-ranked merge until none applies; the last symbol carries
        '</w>'."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda p: self.merge_rank.get(p, float("inf")))
            if best not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(word):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self.cache[token] = out
        return out

    def encode(self, text):
        ids = []
        for piece in self.pattern.findall(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return ids

    def decode(self, ids):
        text = "".join(self.decoder[int(i)] for i in ids)
        return (bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
                .replace("</w>", " "))


@lru_cache()
def get_tokenizer():
    return SimpleTokenizer()


def tokenize(texts, context_length=77, truncate=True):
    """texts (str or list of str) -> LongTensor (len(texts), context_length): SOT + tokens + EOT,
    zero padded. Too long: cut to context_length with EOT as the last token (truncate=True) or
    raise."""
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot_token] + tok.encode(text) + [tok.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"text {i} has {len(ids)} tokens, more than the context length "
                                   f"{context_length}; shorten it or call "
                                   "tokenize(..., truncate=True)")
            ids = ids[:context_length]
            ids[-1] = tok.eot_token
        out[i, :len(ids)] = torch.tensor(ids)
    return out


# --------------------------------------------------------------------------------------------------
# Model

@dataclass
class CLIPConfig:
    embed_dim: int = 512  # joint image-text embedding
    image_resolution: int = 224
    vision_layers: int = 12
    vision_width: int = 768
    vision_patch_size: int = 16
    context_length: int = 77
    vocab_size: int = 49408
    transformer_width: int = 512
    transformer_heads: int = 8
    transformer_layers: int = 12
    # OpenAI's rule; open_clip's H/14, g/14, bigG/14 use 80, 88, 104 (VISION_HEAD_WIDTH)
    vision_head_width: int = 64
    # 0: 4 x vision_width (every OpenAI model; open_clip's g/14 and bigG/14 differ)
    vision_mlp_width: int = 0
    # OpenAI's x * sigmoid(1.702 x); most open_clip pretrainings use exact nn.GELU
    quick_gelu: bool = True

    @property
    def vision_heads(self):
        return self.vision_width // self.vision_head_width


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the input dtype (the released weights are fp16)."""

    def forward(self, x):
        w, b = self.weight.float(), self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names (in_proj_weight rows are
    q;k;v). `qkv` and `merge` are exposed so the surgery path (and training-free baselines) can
    recombine them."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def qkv(self, x):
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, N, 3C)
        # (3, B, H, N, D)
        qkv = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]

    def merge(self, o):
        B, H, N, D = o.shape
        return self.out_proj(o.transpose(1, 2).reshape(B, N, H * D))  # (B, N, C)

    def forward(self, x, causal=False):
        q, k, v = self.qkv(x)
        return self.merge(F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def forward_surgery(self, x):
        """Returns (v-v attention, original attention) through the shared output projection
        (docs/method.md)."""
        q, k, v = self.qkv(x)
        a_vv = F.scaled_dot_product_attention(v, v, v)
        a_ori = F.scaled_dot_product_attention(q, k, v)
        return self.merge(a_vv), self.merge(a_ori)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, mlp_width=0, quick_gelu=True):
        super().__init__()
        mlp_width = mlp_width or 4 * width
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        # named children so keys read mlp.c_fc / mlp.c_proj as in OpenAI's file
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        # no weights: the file can't tell
        self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))
        self.ln_2 = LayerNorm(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, mlp_width=0, quick_gelu=True):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, mlp_width, quick_gelu)
                                        for _ in range(layers)])

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        W, P = cfg.vision_width, cfg.vision_patch_size
        grid = cfg.image_resolution // P
        self.patch_size = P
        self.conv1 = nn.Conv2d(3, W, kernel_size=P, stride=P, bias=False)
        self.class_embedding = nn.Parameter(W ** -0.5 * torch.randn(W))
        self.positional_embedding = nn.Parameter(W ** -0.5 * torch.randn(grid * grid + 1, W))
        self.ln_pre = LayerNorm(W)
        self.transformer = Transformer(W, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp_width,
                                       cfg.quick_gelu)
        self.ln_post = LayerNorm(W)
        self.proj = nn.Parameter(W ** -0.5 * torch.randn(W, cfg.embed_dim))

    def positional_embedding_for(self, h, w):
        """Positional embedding for an h x w patch grid: the CLS row kept, the grid rows resized
        bicubically (align_corners=False, no antialias). The parameter itself is never
        overwritten."""
        pe = self.positional_embedding
        g = int(round((pe.shape[0] - 1) ** 0.5))
        if (h, w) == (g, g):
            return pe
        grid = pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bicubic",
                             align_corners=False).to(pe.dtype)
        return torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])  # (1 + h*w, C)

    def embed(self, x):
        """(B, 3, H, W) image -> (B, 1 + h*w, C) tokens after ln_pre, and the grid (h, w)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        H, W = x.shape[-2:]
        P = self.patch_size
        if H % P or W % P:
            raise ValueError(f"image height and width must be multiples of the patch size {P}, "
                             f"got {H}x{W}; resize or pad the image first")
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, C, h, w)
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        # (B, 1 + h*w, C)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_for(h, w).to(x.dtype)
        return self.ln_pre(x), (h, w)

    def head(self, x):
        """The frozen ln_post + proj: (..., C) -> (..., embed_dim)."""
        return self.ln_post(x) @ self.proj

    def forward(self, x):
        x, _ = self.embed(x)
        return self.head(self.transformer(x)[:, 0])

    def forward_surgery(self, x, surgery_layers=None):
        """CLIP Surgery dual path over the last `surgery_layers` blocks (docs/method.md; default:
        the last half, 6 of ViT-B's 12 as the authors use, 12 of ViT-L's 24). Returns the x_new
        tokens (B, 1 + h*w, C) BEFORE ln_post, token 0 being the CLS of x_ori, and (h, w). With
        surgery_layers=0 this is the plain model's pre-ln_post token sequence."""
        blocks = self.transformer.resblocks
        if surgery_layers is None:
            surgery_layers = len(blocks) // 2
        if not 0 <= surgery_layers <= len(blocks):
            raise ValueError(f"surgery_layers must be in [0, {len(blocks)}], got {surgery_layers}")
        x, grid = self.embed(x)
        first = len(blocks) - surgery_layers
        for block in blocks[:first]:
            x = block(x)
        x_ori, x_new = x, x
        for block in blocks[first:]:
            # both from the ORIGINAL stream
            a_vv, a_ori = block.attn.forward_surgery(block.ln_1(x_ori))
            x_new = x_new + a_vv  # no LayerNorm, no MLP on the new path
            x_ori = x_ori + a_ori
            x_ori = x_ori + block.mlp(block.ln_2(x_ori))
        x_new = torch.cat([x_ori[:, :1], x_new[:, 1:]], dim=1)
        return x_new, grid


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.transformer = Transformer(cfg.transformer_width, cfg.transformer_layers,
                                       cfg.transformer_heads, quick_gelu=cfg.quick_gelu)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.transformer_width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length,
                                                                    cfg.transformer_width))
        self.ln_final = LayerNorm(cfg.transformer_width)
        self.text_projection = nn.Parameter(cfg.transformer_width ** -0.5
                                            * torch.randn(cfg.transformer_width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(1 / 0.07).log())

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        """text: (B, L) token ids, L <= context_length -> (B, embed_dim) features at the EOT
        position."""
        L = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:L]  # (B, L, W)
        x = self.ln_final(self.transformer(x, causal=True))
        eot = text.argmax(dim=-1)  # EOT (49407) is the largest id
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, image, text):
        """Returns (logits_per_image, logits_per_text) as in OpenAI's model."""
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits = self.logit_scale.exp() * img @ txt.t()
        return logits, logits.t()


# --------------------------------------------------------------------------------------------------
# Loading OpenAI / open_clip checkpoints

def config_from_state_dict(sd, quick_gelu=True):
    """Infer every size of the model from tensor shapes (B/32, B/16, L/14, L/14@336, open_clip's
    wider towers and small test configs). What shapes cannot show comes from outside: the activation
    (`activation_for`) and the vision head width of open_clip's H, g and bigG towers
    (VISION_HEAD_WIDTH, keyed by their unique widths)."""
    if "visual.conv1.weight" not in sd:
        found = ("a ResNet CLIP" if any(k.startswith("visual.layer1.") for k in sd)
                 else "not a CLIP state dict")
        raise ValueError(f"only ViT CLIP checkpoints are supported; this one is {found} "
                         f"(first keys: {sorted(sd)[:5]})")

    def count_layers(prefix):
        return len({k.split(".")[len(prefix.split("."))] for k in sd if k.startswith(prefix + ".")})

    conv = sd["visual.conv1.weight"]
    grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
    mlp = sd.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    return CLIPConfig(
        embed_dim=sd["text_projection"].shape[1],
        image_resolution=conv.shape[-1] * grid,
        vision_layers=count_layers("visual.transformer.resblocks"),
        vision_width=conv.shape[0],
        vision_patch_size=conv.shape[-1],
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        transformer_width=sd["ln_final.weight"].shape[0],
        transformer_heads=sd["ln_final.weight"].shape[0] // 64,
        transformer_layers=count_layers("transformer.resblocks"),
        vision_head_width=VISION_HEAD_WIDTH.get(conv.shape[0], 64),
        vision_mlp_width=0 if mlp is None or mlp.shape[0] == 4 * conv.shape[0] else mlp.shape[0],
        quick_gelu=quick_gelu,
    )


def build_model(state_dict, quick_gelu=True):
    """Build a CLIP from a state dict with OpenAI's key names; every key and shape is checked, then
    loaded strictly. fp16 tensors are cast to fp32; OpenAI's non-weight entries are dropped.
    quick_gelu: the MLP activation, which the weights do not reveal (`activation_for` decides it for
    a file). Returns the model in eval mode."""
    sd = {k: v for k, v in state_dict.items() if k not in NON_WEIGHT_KEYS}
    bad = [k for k, v in sd.items() if not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"checkpoint entries that are not tensors: {bad[:10]}")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model = CLIP(config_from_state_dict(sd, quick_gelu))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [f"{k}: {tuple(sd[k].shape)} != {tuple(s)}" for k, s in expected.items()
             if k in sd and sd[k].shape != s]
    if missing or unexpected or wrong:
        raise ValueError("checkpoint does not match the CLIP architecture inferred from it:"
                         + (f"\n  missing keys ({len(missing)}): {missing[:10]}" if missing else "")
                         + (f"\n  unknown keys ({len(unexpected)}): {unexpected[:10]}"
                            if unexpected else "")
                         + (f"\n  wrong shapes ({len(wrong)}): {wrong[:10]}" if wrong else ""))
    model.load_state_dict(sd, strict=True)
    return model.eval()


def is_torchscript(path):
    """OpenAI's releases are TorchScript archives (a zip holding code/ and constants.pkl);
    torch.save files are not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path):
    """A .safetensors file (how open_clip's models are published on the Hugging Face hub) ->
    {name: tensor}. The format: an 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor bytes, offsets counted
    from the end of the header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        sd = {}
        for name, t in header.items():
            if t["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name} has dtype {t['dtype']}, "
                                 "which this reader does not know")
            begin, end = t["data_offsets"]
            f.seek(8 + n + begin)
            data = bytearray(f.read(end - begin))
            dtype = SAFETENSORS_DTYPES[t["dtype"]]
            sd[name] = (torch.frombuffer(data, dtype=dtype) if data
                        else torch.zeros(0, dtype=dtype)).reshape(t["shape"])
    return sd


def read_state_dict(path, info=None):
    """Read a TorchScript archive (OpenAI's release), a torch.save'd state dict, an open_clip
    checkpoint ({'state_dict': ...}, possibly with DDP's 'module.' prefix) or a .safetensors file
    (open_clip's models on the Hugging Face hub) into a plain {name: tensor} dict on the CPU. info
    (a dict), if given, receives the 'name' an open_clip training checkpoint records (its run name,
    which holds the model name, e.g. '...ViT-B-32-quickgelu...')."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path} (give a checkpoint file or one of "
                                f"the model names {sorted(MODELS)}, which are downloaded)")
    try:
        if path.endswith(".safetensors"):
            sd = read_safetensors(path)
        elif is_torchscript(path):
            # torch marks TorchScript deprecated; OpenAI's release is one
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                sd = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"could not read checkpoint {path} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); the file is "
                           "corrupt or truncated: delete it and download it again") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        if info is not None and isinstance(sd.get("name"), str):
            info["name"] = sd["name"]
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"checkpoint {path} holds a {type(sd).__name__}, not a state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def activation_for(path, quick_gelu=None, names=()):
    """(quick_gelu, why) for a checkpoint file. The activation is not in the weights: OpenAI trained
    with QuickGELU, open_clip's LAION and DataComp models with exact GELU, MetaCLIP with QuickGELU.
    A wrong guess does not fail, it quietly shifts every feature, so the choice is always reported.
    Order: the caller's explicit choice (a flag); OpenAI's TorchScript release;
    open_clip_config.json beside the file (the hub's repos ship one) when its model_cfg says
    quick_gelu (older snapshots of some QuickGELU repos lack the key, so its absence is no answer);
    a hint in the file name, its Hugging Face cache folder or `names` (the run name of an open_clip
    training checkpoint, the URL it came from; open_clip names QuickGELU models '*-quickgelu*', e.g.
    'ViT-B-32-quickgelu-metaclip_400m.pt'); else exact GELU. MetaCLIP's own files (b32_400m.pt, ...)
    carry no hint: they need the flag."""
    if quick_gelu is not None:
        return quick_gelu, "as asked"
    if is_torchscript(path):
        return True, "OpenAI's TorchScript release"
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
    silent_config = False
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            model_cfg = json.load(f).get("model_cfg", {})
        if "quick_gelu" in model_cfg:
            return bool(model_cfg["quick_gelu"]), "open_clip_config.json beside it"
        silent_config = True
    # only names that describe the model: the file, and a hub cache folder models--org--repo (not
    # the user's folders)
    names = ([os.path.basename(path)]
             + [d for d in os.path.abspath(path).split(os.sep) if d.startswith("models--")]
             + list(names))
    hint = next((h for h in QUICK_GELU_HINTS for n in names if h in n.lower()), None)
    if hint:
        return True, f"'{hint}' in its name"
    if silent_config:
        return False, ("open_clip_config.json beside it names no quick_gelu: "
                       "open_clip's default, GELU")
    return False, ("a state dict with no QuickGELU hint in its name: open_clip's default "
                   "(LAION, DataComp); pass --clip-act quickgelu for a model trained with "
                   "QuickGELU")


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def replaced(path, mode="wb", suffix=".tmp"):
    """Write `path` through a temporary file of this process (several ranks may write at once),
    renamed over it when the block ends without an error: a crash or an error leaves the old file
    (or none), never half a file. Yields the open file."""
    tmp = f"{path}{suffix}{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def download_file(url, target, sha256=None):
    """Fetch url to target with a tqdm progress bar (via target.part, renamed when complete and, if
    sha256 is given, verified). An existing verified file is reused. Offline: one clear line saying
    where to put it."""
    if os.path.isfile(target) and (sha256 is None or file_sha256(target) == sha256):
        return target
    if os.path.isfile(target):
        print(f"{target} exists but its SHA-256 does not match; downloading it again",
              file=sys.stderr)
    from tqdm import tqdm
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    try:
        with replaced(target, suffix=".part") as dst:  # renamed only once complete and verified
            with urllib.request.urlopen(url, timeout=30) as src:
                total = int(src.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="iB", unit_scale=True, unit_divisor=1024,
                          desc=os.path.basename(target)) as bar:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        dst.write(chunk)
                        bar.update(len(chunk))
            dst.flush()
            if sha256 is not None and file_sha256(dst.name) != sha256:
                raise ValueError(f"downloaded {os.path.basename(target)} does not match its "
                                 f"SHA-256 {sha256}; try again")
    except ValueError as e:
        raise RuntimeError(str(e)) from None
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(f"could not download {url} ({e}); download it by hand and put it at "
                           f"{target}") from None
    return target


def known_patch_size(name):
    """The patch size of an OpenAI model name ('ViT-L/14@336px' -> 14), None for a path or URL: lets
    a command check its window before a download."""
    return int(name.split("/")[1].split("@")[0]) if name in MODELS else None


def download(name="ViT-B/16", root=None):
    """Fetch a checkpoint to a cache (default ~/.cache/clip) and return the path. OpenAI's URLs (and
    any URL whose second-to-last part is a SHA-256) are checked against it and cached by file name;
    another URL (e.g. a Hugging Face `.../resolve/main/open_clip_pytorch_model.bin`, a name many
    repos share) is cached in a folder named after the URL, unverified."""
    url = MODELS.get(name, name)
    if not url.startswith(("http://", "https://", "file://")):
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}, "
                         "or pass a URL or a local path")
    root = root or os.path.expanduser("~/.cache/clip")
    # not the query: '...safetensors?download=true'
    parts = urllib.parse.urlsplit(url).path.split("/")
    if len(parts) > 1 and re.fullmatch(r"[0-9a-f]{64}", parts[-2]):
        return download_file(url, os.path.join(root, parts[-1]), sha256=parts[-2])
    target = os.path.join(root, "url-" + hashlib.sha256(url.encode()).hexdigest()[:16],
                          parts[-1] or "model.pt")
    if not os.path.isfile(target):
        print(f"{url}: no SHA-256 in the URL, so the download is not verified", file=sys.stderr)
    return download_file(url, target)


def url_names(url):
    """The parts of a URL that name the model (for the activation hints): its file name and, for a
    Hugging Face URL (.../org/repo/resolve/rev/file), org/repo. Not its other folders: those are the
    user's or the host's."""
    parts = urllib.parse.urlsplit(url).path.split("/")
    names = [parts[-1]]
    if "resolve" in parts and parts.index("resolve") >= 2:
        i = parts.index("resolve")
        names.append("/".join(parts[i - 2:i]))
    return names


def load(name_or_path="ViT-B/16", device="cpu", root=None, quick_gelu=None):
    """A model name (downloaded and cached), a URL, or a checkpoint path -> CLIP model in eval
    mode, fp32.
    quick_gelu: None decides from the file (`activation_for`); model.activation says what was used
    and why."""
    is_remote = name_or_path in MODELS or "://" in name_or_path
    # a missing path: "checkpoint not found"
    path = download(name_or_path, root) if is_remote else name_or_path
    info = {}
    sd = read_state_dict(path, info)
    # names that describe the model besides the path: an open_clip training run's name, another
    # site's URL
    names = [info.get("name")] + (url_names(name_or_path)
                                  if is_remote and name_or_path not in MODELS else [])
    quick_gelu, why = activation_for(path, quick_gelu, [n for n in names if n])
    model = build_model(sd, quick_gelu).to(device)
    model.activation = f"{'QuickGELU' if quick_gelu else 'GELU'} ({why})"
    return model


def describe(model):
    """One line naming the backbone's shape and activation, for logs: results must say which CLIP
    made them."""
    c = model.cfg
    return (f"ViT with patch {c.vision_patch_size}, {c.image_resolution} px, {c.vision_layers} "
            f"blocks of width {c.vision_width} ({c.vision_heads} heads), embedding {c.embed_dim}, "
            f"{getattr(model, 'activation', 'QuickGELU' if c.quick_gelu else 'GELU')}")


# --------------------------------------------------------------------------------------------------
# Command line: zero-shot probabilities for one image

def demo_image(size=224):
    """A built-in test picture (a red disc on white), so the command runs without any file."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(img).ellipse([size // 5, size // 5, 4 * size // 5, 4 * size // 5],
                                fill=(220, 20, 20))
    return img


def preprocess(img, size=224, mean=OPENAI_MEAN, std=OPENAI_STD):
    """PIL image -> (1, 3, size, size) tensor: short side resize (bicubic), centre crop,
    normalise."""
    from torchvision import transforms as T
    tf = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                    T.ToTensor(), T.Normalize(mean, std)])
    return tf(img.convert("RGB")).unsqueeze(0)


def main():
    parser = argparse.ArgumentParser(description="CLIP zero-shot classification of one image")
    parser.add_argument("--image", default=None,
                        help="image file; omitted: a built-in picture of a red disc")
    parser.add_argument("--texts", default="a red circle,a blue square,a photo of a dog",
                        help="comma-separated candidate captions")
    parser.add_argument("--checkpoint", default="ViT-B/16",
                        help="checkpoint path (OpenAI .pt, state dict or open_clip file) or a "
                             "model name to download")
    parser.add_argument("--clip-act", default="auto", choices=sorted(ACTIVATIONS),
                        help=ACTIVATION_HELP)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    args = parser.parse_args()

    try:
        model = load(args.checkpoint, device=args.device, quick_gelu=ACTIVATIONS[args.clip_act])
    except (RuntimeError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if args.image is None:
        img = demo_image()
    else:
        from PIL import Image
        try:
            img = Image.open(args.image)
        except (OSError, FileNotFoundError) as e:
            sys.exit(f"error: cannot open image {args.image}: {e}")
    print(f"CLIP: {describe(model)}", file=sys.stderr)
    texts = [t.strip() for t in args.texts.split(",") if t.strip()]
    image = preprocess(img, model.cfg.image_resolution).to(args.device)
    with torch.no_grad():
        logits, _ = model(image, tokenize(texts).to(args.device))
    for text, p in sorted(zip(texts, logits.softmax(-1)[0].tolist()), key=lambda t: -t[1]):
        print(f"{p:7.2%}  {text}")


if __name__ == "__main__":
    main()
