"""
TagAlign: the projector on frozen CLIP Surgery features, its losses, and dense open-vocabulary
inference.

Run it on one image (writes --out-dir/figure.png: the labels over the photo, a heatmap per
query):
    python tagalign.py --checkpoint ckpt.pt --image photo.jpg --queries "brown cat,dog"
    python tagalign.py --image photo.jpg --queries "brown cat,dog"
        # no checkpoint: raw CLIP Surgery
    python tagalign.py --image photo.jpg --queries "cat,dog" --method naclip
        # a training-free baseline

What it implements (arXiv 2312.14149 v3; docs/method.md):
- Sec. 3.2: a gated-conv projector (2 residual blocks x 2 branches: LayerNorm -> GELU -> 3x3 conv ->
  tanh(g), g = 0 at init, so the projector starts as the identity) on the CLIP Surgery patch tokens
  (as wide as the vision tower: 768 for ViT-B, 1024 for ViT-L; surgery on the last half of its
  blocks by default), then a trainable copy of CLIP's ln_post + proj. Image embedding z = spatial
  mean.
- Eq. 1-2: multi-tag classification, s_k = tau cos(z, c_k), softmax over the K tags, loss averaged
  over the image's tags P: -(1/|P|) sum_{k in P} log p_k, then over the batch (as the authors' code:
  images without tags add 0; `average="tagged"` averages over tagged images only). Eq. 4: balanced
  softmax, softmax(s_k + log f_k) (paper's default; the authors' released code trains with the plain
  softmax: `--tag-loss plain`).
- Eq. 5: symmetric image-text InfoNCE against the frozen CLIP caption embedding, features
  all-gathered with gradient across ranks. Eq. 6: L = L_obj + w_attr L_attr + lambda L_itc.
- Eq. 7-8 (rule v3): per window P = (1 - a) softmax(30 cos(f_tagalign, t))
  + a softmax(30 cos(f_clip, t)); rule v1: 0.7 sigmoid(10 cos_tagalign - 2.5)
  + 0.3 sigmoid(10 cos_clip - 2.5). Sliding windows averaged over overlaps, resized to the
  original image, background by threshold; optional PAMR (Araslanov & Roth 2020) on each window's
  TagAlign term at its patch grid before the CLIP term is added, where TCL's evaluation applies it.
- Training-free baselines on the same backbone: MaskCLIP, SCLIP, ClearCLIP, NACLIP and plain CLIP.
"""
import argparse
import hashlib
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import clip_model

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE_FILES = {"tcl9": "templates_tcl9.txt", "clip80": "templates_clip80.txt"}
TAG_TEMPLATE = "A photo of a {}."  # the fixed prompt of the tag embeddings (Sec. 3.3)
BASELINES = ("surgery", "plain", "maskclip", "sclip", "clearclip", "naclip")


@dataclass
class TagAlignConfig:
    # CLIP Surgery on the last N vision blocks; None: the last half (6 of 12)
    surgery_layers: Optional[int] = None
    projector_blocks: int = 2  # residual blocks, each of two gated-conv branches
    init_temperature: float = 1 / 0.07  # tau of Eq. 1 and of Eq. 5, learned as log(tau)
    max_temperature: float = 100.0


# --------------------------------------------------------------------------------------------------
# Model

class GatedConv(nn.Module):
    """One pre-activation branch: LayerNorm over channels -> GELU -> 3x3 conv, scaled by tanh(g),
    g = 0 at init."""

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-5)
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x):  # x: (B, C, h, w)
        # normalise each pixel's channel vector
        y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv(F.gelu(y)) * torch.tanh(self.gate)


class Projector(nn.Module):
    def __init__(self, width, blocks=2):
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleList([GatedConv(width), GatedConv(width)])
                                     for _ in range(blocks)])

    def forward(self, x):
        for branch1, branch2 in self.blocks:
            x = x + branch1(x)
            x = x + branch2(x)
        return x


class TagAlign(nn.Module):
    """Frozen CLIP (with surgery) -> projector -> trainable ln_post + proj copy -> 512-d features
    per patch."""

    def __init__(self, clip: clip_model.CLIP, cfg: TagAlignConfig = TagAlignConfig()):
        super().__init__()
        if cfg.surgery_layers is None:
            # recorded as a number, so a checkpoint says what it was trained with
            cfg = replace(cfg, surgery_layers=clip.cfg.vision_layers // 2)
        self.cfg = cfg
        self.clip = clip.eval().requires_grad_(False)
        width = clip.cfg.vision_width
        self.projector = Projector(width, cfg.projector_blocks)
        self.ln_post = nn.LayerNorm(width, eps=1e-5)
        self.ln_post.load_state_dict(clip.visual.ln_post.state_dict())
        self.proj = nn.Parameter(clip.visual.proj.detach().clone())
        self.logit_scale_tag = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))
        self.logit_scale_itc = nn.Parameter(torch.tensor(math.log(cfg.init_temperature)))

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # CLIP is frozen: always in eval mode
        return self

    def temperatures(self):
        """(tau_tag, tau_itc) with the exp capped, as CLIP does."""
        cap = self.cfg.max_temperature
        return self.logit_scale_tag.exp().clamp(max=cap), self.logit_scale_itc.exp().clamp(max=cap)

    @torch.no_grad()
    def clip_patches(self, images):
        """Frozen CLIP Surgery tokens: (B, 3, H, W) -> (B, C, h, w) patch tokens before ln_post (C:
        the vision width, 768 for ViT-B)."""
        x, (h, w) = self.clip.visual.forward_surgery(images, self.cfg.surgery_layers)
        return x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, C, h, w)

    def project(self, patches):
        """(B, C, h, w) surgery tokens -> (B, h, w, D) TagAlign features (unnormalised)."""
        x = self.projector(patches).permute(0, 2, 3, 1)  # (B, h, w, C)
        return self.ln_post(x) @ self.proj

    def forward(self, images):
        """Returns the dense features (B, h, w, D) and the image embedding z = their spatial mean
        (B, D)."""
        f = self.project(self.clip_patches(images))
        return f, f.mean(dim=(1, 2))

    def dense_features(self, images):
        """(f_tagalign, f_clip), both (B, h, w, D): the features of Eq. 7-8; f_clip is the frozen
        ln_post + proj of the same surgery tokens."""
        patches = self.clip_patches(images)
        return self.project(patches), self.clip.visual.head(patches.permute(0, 2, 3, 1))

    @torch.no_grad()
    def encode_text(self, tokens):
        return self.clip.encode_text(tokens)

    def trainable_state_dict(self):
        """Everything that is learned (projector, ln_post/proj copy, temperatures); CLIP is not
        included."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("clip.")}

    def load_trainable_state_dict(self, sd):
        expected = self.trainable_state_dict()
        missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
        wrong = [k for k in expected if k in sd and sd[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"TagAlign state does not match: missing {missing[:5]}, "
                             f"unknown {unexpected[:5]}, wrong shapes {wrong[:5]}; "
                             "was it trained with another CLIP or projector size?")
        self.load_state_dict({**{k: v for k, v in self.state_dict().items()
                                 if k.startswith("clip.")}, **sd})


def save_atomically(obj, path):
    """torch.save through clip_model.replaced: a crash leaves the old file, never half a file (a
    resume or a cache must not read a torn one)."""
    with clip_model.replaced(path) as f:
        torch.save(obj, f)


def save_checkpoint(path, model: TagAlign, clip_name, **extra):
    """Trainable state + config, written atomically (temp file + rename). `extra`: optimizer, step,
    ... . The CLIP's activation is recorded with its name: a file does not reveal it, and the
    projector is trained on its features."""
    obj = {"model": model.trainable_state_dict(), "config": asdict(model.cfg), "clip": clip_name,
           "clip_quick_gelu": model.clip.cfg.quick_gelu, **extra}
    save_atomically(obj, path)


def read_checkpoint(path):
    """A TagAlign checkpoint file -> its dict (trainable state, config, the CLIP's name and
    activation)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"TagAlign checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"could not read TagAlign checkpoint {path} ({type(e).__name__}); "
                           "is it corrupt?") from e
    keys = ("model", "config", "clip", "clip_quick_gelu")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise ValueError(f"{path} is not a TagAlign checkpoint of train.py "
                         f"(expected keys {', '.join(keys)})")
    return ckpt


def recorded_activation(ckpt):
    """The CLIP activation a checkpoint was trained with (True: QuickGELU)."""
    return ckpt["clip_quick_gelu"]


def fetch_clip_once(name):
    """Before every rank loads a CLIP by name or URL: the first process of each node downloads it
    (into the shared cache) while the others wait, so that 8 ranks of a fresh node do not fetch
    335 MB at once."""
    if (name in clip_model.MODELS or "://" in name) and distributed():
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            clip_model.download(name)
        dist.barrier()


def load_checkpoint(path, clip=None, device="cpu"):
    """A TagAlign checkpoint -> model in eval mode. The frozen CLIP is loaded from the name/path
    recorded in the checkpoint, with the recorded activation, unless a CLIP model is given (whose
    activation must then match)."""
    ckpt = read_checkpoint(path)
    recorded = recorded_activation(ckpt)
    if clip is None:
        fetch_clip_once(ckpt["clip"])
        clip = clip_model.load(ckpt["clip"], quick_gelu=recorded)
        clip.activation = (f"{'QuickGELU' if recorded else 'GELU'} "
                           "(recorded in the TagAlign checkpoint)")
    elif clip.cfg.quick_gelu != recorded:
        act = lambda q: "QuickGELU" if q else "GELU"
        raise ValueError(f"{path} was trained on a CLIP with {act(recorded)}, the CLIP given uses "
                         f"{act(clip.cfg.quick_gelu)}; "
                         f"pass --clip-act {'quickgelu' if recorded else 'gelu'}")
    model = TagAlign(clip, TagAlignConfig(**ckpt["config"]))
    model.load_trainable_state_dict(ckpt["model"])
    return model.to(device).eval()


def check_model_files(checkpoint=None, clip=None, window=None, surgery_layers=None):
    """Fail in a second, not after a CLIP download: the checkpoint must be a file, and clip a known
    model name, a URL or a file. With a window, a CLIP named by OpenAI's name (given, or the
    checkpoint's) must have a patch size that divides it; with surgery_layers and a checkpoint, they
    must be the checkpoint's (it was trained with its own)."""
    if checkpoint and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"TagAlign checkpoint not found: {checkpoint}")
    if clip and clip not in clip_model.MODELS and "://" not in clip and not os.path.isfile(clip):
        raise FileNotFoundError(f"CLIP checkpoint not found: {clip} (a file, or a model name: "
                                f"{', '.join(clip_model.MODELS)})")
    ckpt = (read_checkpoint(checkpoint)
            if checkpoint and (surgery_layers is not None or window and not clip) else None)
    if window:
        check_window(window, clip_model.known_patch_size(
            clip or (ckpt.get("clip", "") if ckpt else "ViT-B/16")))
    if (ckpt and surgery_layers is not None
            and surgery_layers != ckpt["config"].get("surgery_layers")):
        raise ValueError(f"--surgery-layers {surgery_layers}, but {checkpoint} was trained with "
                         f"{ckpt['config'].get('surgery_layers')}: drop the flag "
                         "(the checkpoint's is used)")


def load_model(checkpoint=None, clip=None, surgery_layers=None, device="cpu", quick_gelu=None):
    """A TagAlign checkpoint, or without one the untrained model (identity projector = CLIP Surgery)
    with surgery_layers (default: the last half of the CLIP's blocks). clip: a CLIP path or name
    (default: the checkpoint's, else ViT-B/16). quick_gelu: the CLIP's activation (None: the
    checkpoint's, else from the file)."""
    # before a CLIP is loaded or downloaded
    check_model_files(checkpoint, clip, surgery_layers=surgery_layers)
    if clip or not checkpoint:
        recorded = None
        if checkpoint and quick_gelu is None:
            # another copy of the same CLIP: keep the activation it was trained on
            recorded = quick_gelu = recorded_activation(read_checkpoint(checkpoint))
        clip = clip or "ViT-B/16"
        fetch_clip_once(clip)  # under torchrun: one download per node
        clip = clip_model.load(clip, device=device, quick_gelu=quick_gelu)
        if recorded is not None:
            clip.activation = (f"{'QuickGELU' if recorded else 'GELU'} "
                               "(recorded in the TagAlign checkpoint)")
    elif quick_gelu is not None:
        # the checkpoint's CLIP with an activation given: load_checkpoint checks they agree
        name = read_checkpoint(checkpoint)["clip"]
        fetch_clip_once(name)
        clip = clip_model.load(name, device=device, quick_gelu=quick_gelu)
    if checkpoint:
        return load_checkpoint(checkpoint, clip, device)
    return TagAlign(clip, TagAlignConfig(surgery_layers=surgery_layers)).to(device).eval()


def inference_defaults(clip):
    """Window and short side that follow the backbone: twice its input resolution (the authors' 448
    for the 224-px ViT-B/16; 672 for L/14@336px), a multiple of the patch size by construction."""
    size = 2 * clip.cfg.image_resolution
    return {"window": size, "short_side": size}


def check_window(window, patch):
    """A window that is not a multiple of the patch size would be padded with zeros, which CLIP
    never saw."""
    if patch and window % patch:
        lo = max(patch, window // patch * patch)
        raise ValueError(f"--window {window} is not a multiple of the CLIP's patch size {patch}; "
                         f"use {lo} or {lo + patch}")


def half_window(window, patch):
    """The default stride of a window without a configured one: half of it, in whole patches."""
    return max(patch, window // 2 // patch * patch)


def scaled_stride(stride, window, patch, authors_window=448):
    """A stride of the authors' config (docs/evaluation.md, ViT-B/16 with 448 windows) for another
    backbone or window: the same fraction of the window, rounded to a multiple of the patch size so
    that every window's patch grid lines up with its neighbours' (B/32: 56 -> 64; L/14 at 448: 56
    stays 4 patches). ViT-B/16 at 448 keeps the authors' values exactly, 56 (3.5 patches)
    included."""
    if (patch, window) == (16, authors_window):
        return stride
    return max(patch, round(stride * window / authors_window / patch) * patch)


# --------------------------------------------------------------------------------------------------
# Text embeddings

def load_templates(name):
    """'single' (TagAlign's default), 'tcl9' or 'clip80' -> list of format strings with one '{}'."""
    if name == "single":
        return ["a photo of a {}."]
    if name not in TEMPLATE_FILES:
        raise ValueError(f"unknown template set {name!r}; choose single, tcl9 or clip80")
    with open(os.path.join(HERE, "data", TEMPLATE_FILES[name]), encoding="utf-8") as f:
        return [line for line in f.read().splitlines() if line.strip()]


@torch.no_grad()
def text_embeddings(clip, names, templates=("a photo of a {}.",), batch_size=256):
    """(len(names), D) L2-normalised: per name, the mean of the unnormalised embeddings over the
    templates."""
    device = next(clip.parameters()).device
    prompts = [t.format(n.strip()) for n in names for t in templates]
    emb = torch.cat([clip.encode_text(clip_model.tokenize(prompts[i:i + batch_size]).to(device))
                     .float() for i in range(0, len(prompts), batch_size)])
    return F.normalize(emb.view(len(names), len(templates), -1).mean(1), dim=-1)


def tag_embeddings(clip, tags, cache_path=None):
    """The fixed tag embeddings c_k of Eq. 1 ("A photo of a {tag}."), cached on disk when a path is
    given. The cache is keyed by the tag list and a fingerprint of the text encoder (its projection
    and its activation, which has no weights to hash), so a stale file is recomputed."""
    fingerprint = hashlib.sha256(clip.text_projection.detach().cpu().float().numpy()
                                 .tobytes()).hexdigest()[:16]
    fingerprint += "quickgelu" if clip.cfg.quick_gelu else "gelu"
    key = hashlib.sha256(("\n".join(tags) + TAG_TEMPLATE + fingerprint).encode()).hexdigest()
    if cache_path and os.path.isfile(cache_path):
        cached = torch.load(cache_path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            return cached["embeddings"]
    emb = text_embeddings(clip, tags, (TAG_TEMPLATE,)).cpu()
    if cache_path:
        save_atomically({"key": key, "embeddings": emb}, cache_path)
    return emb


# --------------------------------------------------------------------------------------------------
# Losses

class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums each rank's gradient for the gathered copies and returns this
    rank's slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device():
    """Where a collective's tensor must live: NCCL only reduces CUDA tensors (on this rank's GPU),
    gloo CPU ones."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t):
    """Sum a tensor over ranks whatever device it lives on (moved to comm_device() for the
    collective and back); the identity in a single process."""
    if not distributed():
        return t
    buf = t.to(comm_device(), copy=True)  # never reduce the caller's tensor in place
    dist.all_reduce(buf)
    return buf.to(t.device)


def gather_with_grad(x):
    """(B, D) on each rank -> (world * B, D) in rank order, differentiable; the identity in a single
    process."""
    return _GatherWithGrad.apply(x) if distributed() else x


# paper Table 6 (+ the authors' plain)
TAG_LOSSES = ("balanced", "plain", "weighted", "focal", "asymmetric")
FOCAL = {"gamma": 2.0, "alpha": 0.25}  # Lin et al. 2017, their best setting
# Ridnik et al. 2021, their recommended one
ASYMMETRIC = {"gamma_neg": 4.0, "gamma_pos": 0.0, "margin": 0.05}
# sigmoid losses: logit s_k - log((1 - pi) / pi), Lin et al.'s prior pi (fixed here)
SIGMOID_PRIOR = 0.01


def inverse_frequency_weights(freq):
    """Weighted softmax's per-tag weights w_k = mean(f) / f_k over the tags that occur (0 for a tag
    that never does: it is never a positive). Normalised so that the average weight of the label
    occurrences, sum_k f_k w_k / sum_k f_k, is 1: the loss keeps the plain softmax's scale, so the
    learning rate keeps its meaning."""
    seen = (freq > 0).float()
    # no boolean indexing: that would read the GPU
    mean = (freq * seen).sum() / seen.sum().clamp(min=1)
    return seen * mean / freq.clamp(min=1e-12)


def sigmoid_tag_losses(s, labels, kind):
    """Per-tag binary losses (B, K) of the sigmoid long-tail losses of paper Table 6, on the logits
    x = s_k - log((1 - pi) / pi) (Eq. 1's scores shifted to the prior pi = 0.01; TagAlign has no
    bias to learn):
    - focal (Lin et al. 2017): -alpha (1 - p)^gamma log p for a tag the image has, -(1 - alpha)
      p^gamma log(1 - p) for one it has not; gamma 2, alpha 0.25;
    - asymmetric (Ridnik et al. 2021): -(1 - p)^gamma+ log p, and -p_m^gamma- log(1 - p_m) with the
      shifted probability p_m = max(p - m, 0); gamma+ 0, gamma- 4, margin m 0.05.
    The gradient flows through the focusing weights ((1 - p)^gamma, p_m^gamma-), as in Lin et al.'s
    definition (Ridnik et al.'s training code can detach them)."""
    x = s - math.log((1 - SIGMOID_PRIOR) / SIGMOID_PRIOR)
    p = torch.sigmoid(x)
    if kind == "focal":
        gamma, alpha = FOCAL["gamma"], FOCAL["alpha"]
        pos = alpha * (1 - p) ** gamma * F.logsigmoid(x)
        neg = (1 - alpha) * p ** gamma * F.logsigmoid(-x)
    elif kind == "asymmetric":
        p_m = (p - ASYMMETRIC["margin"]).clamp(min=0)
        pos = (1 - p) ** ASYMMETRIC["gamma_pos"] * F.logsigmoid(x)
        neg = p_m ** ASYMMETRIC["gamma_neg"] * torch.log((1 - p_m).clamp(min=1e-8))
    else:
        raise ValueError(f"unknown sigmoid tag loss {kind!r}; choose focal or asymmetric")
    return -(labels * pos + (1 - labels) * neg)


def tag_loss(z, tag_emb, labels, tau, kind="balanced", freq=None, average="batch", count=None):
    """Multi-tag classification, Eq. 1-2, with the long-tail variants of paper Table 6 (`kind`):
    - "balanced" (Eq. 4, the paper's): softmax(s_k + log f_k),
      i.e. exp(s_k) f_k / sum_j exp(s_j) f_j;
    - "plain": softmax(s_k) (the authors' released code);
    - "weighted": the plain softmax loss with each tag's term weighted by inverse_frequency_weights;
    - "focal", "asymmetric": per-tag sigmoid losses (sigmoid_tag_losses), summed over the K tags.
    z: (B, D) image embeddings; tag_emb: (K, D) normalised tag embeddings; labels: (B, K) 0/1;
    freq: (K,) tag frequencies f_k (balanced and weighted). Each image's loss is divided by its
    number of tags |P| (-(1/|P|) sum_{k in P} log p_k for the softmax losses); an image without
    tags adds 0 (it may be a failed parse: its negatives are not trusted either).
    They are averaged over
    - average="batch" (default, the authors' code): every image of the global batch, untagged ones
      adding 0, so the loss weights of the released config mean what they meant there;
    - average="tagged": only the images that have tags.
    count: the number of images averaged over, summed over all ranks AND all micro-batches of the
    optimizer step (gradient accumulation: the step's loss is then the sum of its micro-batches'
    values). None: this batch across ranks. The value is scaled by the world size so that DDP's
    gradient averaging gives exactly the gradient of that global mean."""
    if average not in ("batch", "tagged"):
        raise ValueError(f"unknown tag-loss average {average!r}; choose batch or tagged")
    if kind not in TAG_LOSSES:
        raise ValueError(f"unknown tag loss {kind!r}; choose one of {', '.join(TAG_LOSSES)}")
    if kind in ("balanced", "weighted") and freq is None:
        raise ValueError(f"the {kind} tag loss needs the tag frequencies (freq)")
    s = tau * F.normalize(z.float(), dim=-1) @ tag_emb.float().t()  # (B, K), Eq. 1
    labels = labels.float()
    n_pos = labels.sum(1)  # |P| per image
    if kind in ("focal", "asymmetric"):
        per_image = sigmoid_tag_losses(s, labels, kind).sum(1) * (n_pos > 0) / n_pos.clamp(min=1)
    else:
        if kind == "balanced":
            s = s + freq.float().clamp(min=1e-12).log()  # Eq. 4: exp(s_k) f_k / sum_j exp(s_j) f_j
        weights = inverse_frequency_weights(freq.float()) if kind == "weighted" else 1.0
        # (B,)
        per_image = -(labels * weights * F.log_softmax(s, dim=-1)).sum(1) / n_pos.clamp(min=1)
    world = dist.get_world_size() if distributed() else 1
    if count is None:
        if average == "batch":
            count = z.shape[0] * world  # DDP batches are equal on every rank
        else:
            count = all_reduce_sum((n_pos > 0).float().sum())  # stays on the device: no host sync
    if torch.is_tensor(count):
        count = count.clamp(min=1)
    else:
        count = max(count, 1)
    return per_image.sum() * world / count


def contrastive_loss(z, t, tau):
    """Symmetric image-text InfoNCE (Eq. 5) over the global batch: local rows vs gathered columns,
    labels offset by rank. z, t: (B, D) image and caption embeddings (normalised here)."""
    z, t = F.normalize(z.float(), dim=-1), F.normalize(t.float(), dim=-1)
    z_all, t_all = gather_with_grad(z), gather_with_grad(t)  # (world * B, D)
    offset = dist.get_rank() * z.shape[0] if distributed() else 0
    labels = torch.arange(z.shape[0], device=z.device) + offset
    return (F.cross_entropy(tau * z @ t_all.t(), labels)
            + F.cross_entropy(tau * t @ z_all.t(), labels)) / 2


def tagalign_loss(model: TagAlign, z, caption_emb, obj_labels, obj_emb, attr_labels=None,
                  attr_emb=None, obj_freq=None, attr_freq=None, attribute_weight=1.0,
                  itc_weight=1.0, object_weight=1.0, tag_average="batch", tag_counts=(None, None),
                  accumulation=1, tag_loss_kind="balanced"):
    """Eq. 6: L = object_weight L_obj + attribute_weight L_attr + itc_weight L_itc. A term whose
    weight is 0 is not computed (its temperature then gets no gradient: train.py freezes it, as DDP
    requires). With gradient accumulation over `accumulation` micro-batches each call returns this
    micro-batch's share of the step's loss: the tag terms divided by tag_counts = (objects,
    attributes) images of the whole step (see tag_loss), the contrastive term divided by
    `accumulation` (the mean of the micro-batches' InfoNCE, each over its own micro-batch's
    negatives). Summed over the step's micro-batches, total and terms are the step's values.
    Returns (total, {name: value}) with the unweighted terms."""
    tau_tag, tau_itc = model.temperatures()
    terms, total = {}, z.new_zeros(())
    if object_weight:
        terms["obj"] = tag_loss(z, obj_emb, obj_labels, tau_tag, tag_loss_kind, obj_freq,
                                tag_average, tag_counts[0])
        total = total + object_weight * terms["obj"]
    if attribute_weight and attr_labels is not None:
        terms["attr"] = tag_loss(z, attr_emb, attr_labels, tau_tag, tag_loss_kind, attr_freq,
                                 tag_average, tag_counts[1])
        total = total + attribute_weight * terms["attr"]
    if itc_weight:
        terms["itc"] = contrastive_loss(z, caption_emb, tau_itc) / accumulation
        total = total + itc_weight * terms["itc"]
    return total, terms


# --------------------------------------------------------------------------------------------------
# Training-free baselines: the last vision block rewired (docs/method.md), then the frozen
# ln_post + proj.

def gaussian_prior(h, w, sigma, device):
    """NACLIP's neighbourhood prior: exp(-d^2 / (2 sigma^2)) between patch positions, (h*w, h*w)."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                            indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()  # (h*w, 2)
    return torch.exp(-torch.cdist(pos, pos).pow(2) / (2 * sigma ** 2))


@torch.no_grad()
def baseline_features(clip, images, method, surgery_layers=None):
    """(B, 3, H, W) -> (B, h, w, D) dense features of a training-free method (not normalised).
    surgery_layers: the CLIP Surgery baseline's depth (None: the last half of the blocks, as
    TagAlign's default)."""
    vis = clip.visual
    if method == "surgery":
        x, (h, w) = vis.forward_surgery(images, surgery_layers)
        return vis.head(x[:, 1:]).view(x.shape[0], h, w, -1)
    x, (h, w) = vis.embed(images)
    *blocks, last = vis.transformer.resblocks
    for block in blocks:
        x = block(x)
    if method == "plain":
        x = last(x)
    else:
        y = last.ln_1(x)
        q, k, v = last.attn.qkv(y)  # (B, H, N, d)
        if method == "maskclip":  # value path; residual and MLP kept
            x = x + last.attn.merge(v)
            x = x + last.mlp(last.ln_2(x))
        elif method == "sclip":  # correlative self-attention; residual and MLP kept
            scale = q.shape[-1] ** -0.5
            attn = ((q @ q.transpose(-1, -2) * scale).softmax(-1)
                    + (k @ k.transpose(-1, -2) * scale).softmax(-1))
            x = x + last.attn.merge(attn @ v)
            x = x + last.mlp(last.ln_2(x))
        elif method == "clearclip":  # q-q attention; no residual, no MLP
            x = last.attn.merge(F.scaled_dot_product_attention(q, q, v))
        elif method == "naclip":
            # k-k attention + Gaussian neighbourhood prior on the patch grid; no residual/MLP
            prior = torch.zeros(q.shape[-2], q.shape[-2], device=x.device, dtype=q.dtype)
            prior[1:, 1:] = gaussian_prior(h, w, 5.0, x.device).to(q.dtype)
            x = last.attn.merge(F.scaled_dot_product_attention(k, k, v, attn_mask=prior))
        else:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(BASELINES)}")
    return vis.head(x[:, 1:]).view(x.shape[0], h, w, -1)


def feature_fn(model, method="tagalign"):
    """The inference path's feature source: windows (n, 3, H, W) -> (f_main, f_clip), each
    (n, h, w, D); segment() needs the backbone's patch size beside it (patch=). With a TagAlign
    model the surgery baseline uses its surgery layers (the comparison of a trained model with
    its starting point).
    """
    if method == "tagalign" and not isinstance(model, TagAlign):
        raise ValueError("method 'tagalign' needs a TagAlign model")
    clip = model.clip if isinstance(model, TagAlign) else model
    surgery_layers = model.cfg.surgery_layers if isinstance(model, TagAlign) else None

    def features(windows):
        if method == "tagalign":
            return model.dense_features(windows)
        # no CLIP branch of its own
        return baseline_features(clip, windows, method, surgery_layers), None
    return features


# --------------------------------------------------------------------------------------------------
# Dense inference

def window_scores(f_main, f_clip, text_emb, rule="v3", clip_weight=0.5, refine=None):
    """Per-window class maps from features (n, h, w, D) and normalised text embeddings (C, D)
    -> (n, C, h, w).
    v3 (Eq. 7-8): (1 - a) softmax(30 cos_main) + a softmax(30 cos_clip);
    v1: 0.7 sigmoid(10 cos_main - 2.5) + 0.3 sigmoid(10 cos_clip - 2.5);
    'cosine': (1 - a) cos_main + a cos_clip (for heatmaps).
    f_clip None (a training-free baseline): the method's own map alone. refine: applied to the
    model's own term before the CLIP term is added, as TCL applies PAMR to its mask before mixing in
    the CLIP branch."""
    t = text_emb.to(f_main.dtype)
    if rule == "v3":
        weights, prob = (1 - clip_weight, clip_weight), lambda c: (30 * c).softmax(-1)
    elif rule == "v1":
        weights, prob = (0.7, 0.3), lambda c: torch.sigmoid(10 * c - 2.5)
    elif rule == "cosine":
        weights, prob = (1 - clip_weight, clip_weight), lambda c: c
    else:
        raise ValueError(f"unknown rule {rule!r}; choose v3, v1 or cosine")
    if f_clip is None:
        weights = (1.0, 0.0)

    def term(f, weight):  # (n, h, w, D) -> weight * map, (n, C, h, w)
        return (weight * prob(F.normalize(f, dim=-1) @ t.t())).permute(0, 3, 1, 2).float()

    p = term(f_main, weights[0])
    if refine is not None:
        p = refine(p)
    return p + term(f_clip, weights[1]) if weights[1] else p


def window_boxes(H, W, window, stride):
    """mmseg's slide grid: (y1, y2, x1, x2) boxes of size min(window, H) x min(window, W) covering
    the image."""
    wh, ww = min(window, H), min(window, W)
    ny = max(H - wh + stride - 1, 0) // stride + 1
    nx = max(W - ww + stride - 1, 0) // stride + 1
    boxes = []
    for iy in range(ny):
        for ix in range(nx):
            y2, x2 = min(iy * stride + wh, H), min(ix * stride + ww, W)
            boxes.append((y2 - wh, y2, x2 - ww, x2))
    return boxes


def resize_short_side(image, short_side=448, max_long_side=2048):
    """(B, 3, H, W) -> bilinear resize so the short side is short_side (long side at most
    max_long_side)."""
    H, W = image.shape[-2:]
    scale = min(short_side / min(H, W), max_long_side / max(H, W))
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def sliding_scores(features, image, text_emb, window=448, stride=224, window_batch=16,
                   use_pamr=False, patch=16, **rule_kw):
    """Class maps of a normalised image (1, 3, H, W): windows batched through `features`, each
    window's map bilinearly upsampled to the window and averaged over overlaps -> (C, H, W).
    use_pamr: PAMR refines each window's own map (TagAlign's term of Eq. 8, or a baseline's whole
    map) on its patch grid before the CLIP term is added and before the upsampling, as TCL's
    evaluation (which TagAlign's "+PAMR" numbers follow) does: the window's image is shrunk to the
    map's h x w (bilinear, align_corners=True), so the dilations 1..24 are measured in patches, not
    pixels."""
    _, _, H, W = image.shape  # patch: the backbone's patch size, to which windows are padded
    boxes = window_boxes(H, W, window, stride)
    wh, ww = boxes[0][1] - boxes[0][0], boxes[0][3] - boxes[0][2]
    # ViT needs multiples of the patch size: pad right/bottom, crop after
    pad = (0, -ww % patch, 0, -wh % patch)
    total = count = None
    for i in range(0, len(boxes), window_batch):
        chunk = boxes[i:i + window_batch]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])  # (n, 3, wh, ww)
        crops = F.pad(crops, pad)  # (n, 3, wh + pad, ww + pad)
        f_main, f_clip = features(crops)  # (n, h, w, D) each
        refine = None
        if use_pamr:
            # on the model's own map only; the CLIP term of Eq. 8 is added after it (TCL's order)
            small = F.interpolate(crops.float(), size=f_main.shape[1:3], mode="bilinear",
                                  align_corners=True)
            refine = lambda maps: pamr(small, maps)  # (n, C, h, w) -> (n, C, h, w)
        maps = window_scores(f_main, f_clip, text_emb, refine=refine, **rule_kw)  # (n, C, h, w)
        maps = F.interpolate(maps, size=(wh + pad[3], ww + pad[1]), mode="bilinear",
                             align_corners=False)
        maps = maps[:, :, :wh, :ww]
        if total is None:
            total = maps.new_zeros(maps.shape[1], H, W)
            count = maps.new_zeros(1, H, W)
        for (y1, y2, x1, x2), m in zip(chunk, maps):
            total[:, y1:y2, x1:x2] += m
            count[:, y1:y2, x1:x2] += 1
    return total / count


def pamr_neighbours(x, dilations):
    """Yields, one at a time, x (B, c, H, W) read at each of the 8 offsets (+-d, +-d), (0, +-d),
    (+-d, 0) of every dilation d, with replicate padding: (B, c, H, W) views of one padded copy per
    dilation. One at a time so that no (B, c, 48, H, W) stack is ever built (171 classes at
    448 x 597 would be 8.8 GB)."""
    H, W = x.shape[-2:]
    for d in dilations:
        p = F.pad(x, (d, d, d, d), mode="replicate")  # (B, c, H + 2d, W + 2d)
        for dy in (-d, 0, d):
            for dx in (-d, 0, d):
                if (dy, dx) != (0, 0):
                    yield p[:, :, d + dy:d + dy + H, d + dx:d + dx + W]


def pamr(image, masks, dilations=(1, 2, 4, 8, 12, 24), iterations=10):
    """Pixel-adaptive mask refinement (docs/evaluation.md).
    image: (B, 3, H, W) normalised; masks: (B, C, h, w).
    Returns (B, C, H, W). Memory: a few (B, C, H, W) and (B, 48, H, W) tensors; the 48 neighbours
    are visited one at a time (each class evolves independently and all share the affinities)."""
    B, _, H, W = image.shape
    masks = F.interpolate(masks.float(), size=(H, W), mode="bilinear", align_corners=True)
    image = image.float()
    # sigma: unbiased std over the six dilated 3x3 windows (the centre counted once per window:
    # 54 values)
    n = 9 * len(dilations)
    s1, s2 = len(dilations) * image, len(dilations) * image.pow(2)  # (B, 3, H, W) running sums
    for nb in pamr_neighbours(image, dilations):
        s1 = s1 + nb
        s2 = s2 + nb.pow(2)
    scale = 1e-8 + 0.1 * ((s2 - s1.pow(2) / n) / (n - 1)).clamp(min=0).sqrt()  # (B, 3, H, W)
    # affinity logits, one neighbour at a time: mean over the 3 channels of
    # -|I - I_n| / (1e-8 + 0.1 sigma)
    aff = torch.stack([(-(nb - image).abs() / scale).mean(1)
                       for nb in pamr_neighbours(image, dilations)], 1)
    aff = aff.softmax(1)  # (B, 48, H, W), softmax over the neighbours
    for _ in range(iterations):
        new = torch.zeros_like(masks)
        for k, nb in enumerate(pamr_neighbours(masks, dilations)):
            # M <- sum_n a_n M_n; (B, 1, H, W) broadcast over the classes
            new.addcmul_(nb, aff[:, k:k + 1])
        masks = new
    return masks


def to_tensor_image(image):
    """PIL image or (3, H, W) tensor (uint8, or float in [0, 1]) -> (1, 3, H, W) float in [0, 1]."""
    if not torch.is_tensor(image):
        from torchvision.transforms.functional import pil_to_tensor
        image = pil_to_tensor(image.convert("RGB"))
    if image.ndim == 3:
        image = image.unsqueeze(0)
    return image.float() / 255 if image.dtype == torch.uint8 else image.float()


@torch.no_grad()
def segment(features, image, text_emb, rule="v3", clip_weight=0.5, bg_threshold=None, window=448,
            stride=224, short_side=448, window_batch=16, use_pamr=False, patch=16,
            mean=clip_model.IMAGENET_MEAN, std=clip_model.IMAGENET_STD):
    """Open-vocabulary segmentation of one image.
    features: from feature_fn(); patch: its backbone's patch size; image: PIL or (3, H, W) tensor;
    text_emb: (C, D) normalised class embeddings.
    bg_threshold: None, or a score below which a pixel is background (class 0; then class k is
    id k + 1).
    Returns (labels (H, W) long, scores (C[+1], H, W)) at the original resolution."""
    device = text_emb.device
    img = to_tensor_image(image).to(device)
    H0, W0 = img.shape[-2:]
    m, s = (torch.tensor(mean, device=device).view(1, 3, 1, 1),
            torch.tensor(std, device=device).view(1, 3, 1, 1))
    x = (resize_short_side(img, short_side) - m) / s
    scores = sliding_scores(features, x, text_emb, window, stride, window_batch, use_pamr, patch,
                            rule=rule, clip_weight=clip_weight)  # (C, H, W)
    scores = F.interpolate(scores[None], size=(H0, W0), mode="bilinear", align_corners=False)[0]
    if bg_threshold is not None:
        # best below threshold -> 0
        scores = torch.cat([scores.new_full((1, H0, W0), bg_threshold), scores])
    return scores.argmax(0), scores


# --------------------------------------------------------------------------------------------------
# Command line: overlay + heatmaps for one image

def query_shares(scores, has_background=False):
    """What decides a pixel's label, per query: scores (C[+1], H, W) from segment() (rule v3's
    probabilities, or v1's sigmoids; row 0 the constant background score when a threshold was given)
    -> (Q, H, W), each query's share of the rule's total at every pixel (background included), in
    [0, 1] on a fixed scale. Unlike a raw cosine map, min-max scaled per query, it does not show
    what every query has in common."""
    shares = scores / scores.sum(0, keepdim=True).clamp(min=1e-12)
    return shares[1:] if has_background else shares


def heatmap_figure(image, queries, labels, maps, has_background=False, scale=(0.0, 1.0),
                   what="share"):
    """One matplotlib figure for one image: the photo, the argmax labels over it (legend: query ->
    colour), a heatmap per query over the photo titled with its share of the label map, and one
    colour bar for the fixed scale. image: PIL; labels: (H, W) ids (0 = background when
    has_background); maps: (Q, H, W) on `scale`."""
    import matplotlib
    import numpy as np
    from matplotlib.colors import is_color_like, to_rgb
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    photo = np.asarray(image.convert("RGB"))
    h, w = photo.shape[:2]
    # label and heat maps of any size drawn over the whole photo
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    names = (["background"] if has_background else []) + list(queries)
    # a query that names a colour ("red") is drawn in it, the others in tab10's colours
    tab = iter(matplotlib.colormaps["tab10"].colors * len(queries))
    own = [to_rgb(q.strip()) if q.strip().isalpha() and is_color_like(q.strip()) else next(tab)
           for q in queries]
    palette = np.array(([(0.0, 0.0, 0.0)] if has_background else []) + own)
    offset = 1 if has_background else 0
    panels = 2 + len(queries)
    columns = min(panels, 4)
    rows = -(-panels // columns)
    fig = Figure(figsize=(3.2 * columns + 1.5, 3.0 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(photo)
    axes[0].set_title("photo")
    axes[1].imshow(photo)
    axes[1].imshow(palette[labels.numpy()], alpha=0.55, extent=extent, interpolation="nearest")
    axes[1].set_title("labels (argmax)")
    for i, q in enumerate(queries):
        ax = axes[2 + i]
        ax.imshow(photo)
        heat = ax.imshow(maps[i].float().numpy(), cmap="coolwarm", vmin=scale[0], vmax=scale[1],
                         alpha=0.7, extent=extent, interpolation="nearest")
        ax.set_title(f"{q} ({(labels == i + offset).float().mean().item():.0%} of pixels)")
    fig.colorbar(heat, ax=axes.tolist(), label=what, shrink=0.8)
    fig.legend(handles=[Patch(color=c, label=n) for n, c in zip(names, palette)],
               loc="outside lower center", ncols=min(len(names), 6))
    return fig


def add_inference_flags(parser, per_dataset=False):
    """The model and dense-inference flags that tagalign.py (one image) and evaluate.py (the
    benchmarks, per_dataset: a dataset's own background threshold and stride by default) share."""
    parser.add_argument("--checkpoint", default=None,
                        help="TagAlign checkpoint (train.py); omitted: untrained = CLIP Surgery")
    parser.add_argument("--clip", default=None,
                        help="CLIP checkpoint path or name "
                        "(default: the checkpoint's, else ViT-B/16)")
    parser.add_argument("--clip-act", default="auto", choices=sorted(clip_model.ACTIVATIONS),
                        help=clip_model.ACTIVATION_HELP
                        + "; with --checkpoint, auto = the activation it was trained with")
    parser.add_argument("--surgery-layers", type=int, default=None,
                        help="CLIP Surgery blocks of tagalign (untrained) and of the surgery "
                        "baseline (default: the last half of the CLIP's; with --checkpoint, the "
                        "checkpoint's, and a different value is an error)")
    parser.add_argument("--rule", default="v3", choices=["v3", "v1"],
                        help="evaluation rule (docs/evaluation.md)")
    parser.add_argument("--clip-weight", type=float, default=0.5,
                        help="weight a of raw CLIP in rule v3")
    parser.add_argument("--bg-threshold", type=float, default=None,
                        help="score below which a pixel is background (default: "
                        + ("the dataset's)" if per_dataset else "no background)"))
    parser.add_argument("--window", type=int, default=None,
                        help="sliding window size, a multiple of the patch size (default: twice "
                        "the CLIP's input size, 448 for ViT-B/16; 672 for ViT-L/14@336px)")
    parser.add_argument("--stride", type=int, default=None,
                        help="sliding window stride (default: "
                        + ("the dataset's)" if per_dataset else "half the window)"))
    parser.add_argument("--short-side", type=int, default=None,
                        help="resize images so their short side is this before the windows "
                        "(default: the default window)")
    parser.add_argument("--templates", default="single", choices=["single", "tcl9", "clip80"],
                        help="prompt templates")
    parser.add_argument("--pamr", action="store_true",
                        help="PAMR post-processing (the paper's 'Post' rows)")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="TagAlign on one image: overlay and per-query heatmaps")
    parser.add_argument("--image", required=True, help="input image file")
    parser.add_argument("--queries", required=True,
                        help='comma-separated text queries, e.g. "brown cat,dog"')
    parser.add_argument("--method", default="tagalign", choices=("tagalign",) + BASELINES,
                        help="feature source: TagAlign, or a training-free baseline")
    parser.add_argument("--out-dir", default="out/tagalign", help="where the PNGs are written")
    add_inference_flags(parser)
    parser.add_argument("--heatmap", default="share", choices=["share", "cosine"],
                        help="share: each query's share of the rule's probability "
                             "(fixed 0-1 scale); cosine: the raw blended cosine similarity, "
                             "on one scale shared by all queries")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    args = parser.parse_args(argv)

    from PIL import Image
    queries = [q.strip() for q in args.queries.split(",") if q.strip()]
    try:  # the inputs first, in a second; only then CLIP (which may mean a download)
        for flag in ("window", "stride", "short_side"):
            if getattr(args, flag) is not None and getattr(args, flag) <= 0:
                raise ValueError(f"--{flag.replace('_', '-')} must be positive, "
                                 f"got {getattr(args, flag)}")
        if not queries:
            raise ValueError("--queries holds no query; give comma-separated texts, "
                             "e.g. \"brown cat,dog\"")
        if not os.path.isfile(args.image):
            raise FileNotFoundError(f"image not found: {args.image}")
        try:
            img = Image.open(args.image).convert("RGB")
        except OSError as e:
            raise ValueError(f"cannot read image {args.image} ({e})") from e
        # the window before a CLIP download
        check_model_files(args.checkpoint, args.clip, args.window)
        # checks its files and surgery layers first
        model = load_model(args.checkpoint, args.clip, args.surgery_layers, args.device,
                           clip_model.ACTIVATIONS[args.clip_act])
        defaults = inference_defaults(model.clip)
        window = args.window or defaults["window"]
        check_window(window, model.clip.visual.patch_size)
    except (OSError, RuntimeError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"CLIP: {clip_model.describe(model.clip)}", file=sys.stderr)
    text_emb = text_embeddings(model.clip, queries, load_templates(args.templates)).to(args.device)
    features = feature_fn(model, args.method)
    kw = dict(patch=model.clip.visual.patch_size, window=window,
              stride=args.stride or half_window(window, model.clip.visual.patch_size),
              short_side=args.short_side or defaults["short_side"],
              clip_weight=args.clip_weight)
    labels, scores = segment(features, img, text_emb, rule=args.rule,
                             bg_threshold=args.bg_threshold, use_pamr=args.pamr, **kw)

    has_bg = args.bg_threshold is not None
    if args.heatmap == "share":
        maps, scale = query_shares(scores, has_bg), (0.0, 1.0)
    else:
        _, maps = segment(features, img, text_emb, rule="cosine", **kw)
        # one scale for all queries, written on the colour bar
        scale = (maps.min().item(), maps.max().item())
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "figure.png")
    heatmap_figure(img, queries, labels.cpu(), maps.cpu(), has_bg, scale,
                   args.heatmap).savefig(path, dpi=100)
    offset = 1 if has_bg else 0
    print(f"{'query':30s} {'pixels':>8s} {args.heatmap + ' mean':>11s} "
          f"{args.heatmap + ' max':>10s}")
    for i, q in enumerate(queries):
        share = (labels == i + offset).float().mean().item()
        print(f"{q:30s} {share:8.1%} {maps[i].mean().item():11.3f} {maps[i].max().item():10.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
