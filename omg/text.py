"""SDXL text conditioning: CLIP BPE tokenizer, CLIP-L and OpenCLIP bigG text encoders, the 2816-d vector.

CLIP-L runs as transformers' CLIPTextModel and bigG as open_clip's TextTransformer, both built from a
config here (nothing is downloaded). Their state-dict keys are the SGM single-file keys without the
component prefixes in SGM_PREFIXES. Context = [penultimate CLIP-L ‖ penultimate bigG] with no final
norm; pooled = ln_final(bigG)[EOT] @ text_projection (SGM's FrozenCLIPEmbedder and
FrozenOpenCLIPEmbedder2 with layer="penultimate").
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, TextTransformer
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel

from omg.unet import timestep_embedding

BOS, EOS = 49406, 49407
CHUNK = 75  # prompt tokens per 77-position window (BOS + 75 + EOS)
PAD_L, PAD_G = EOS, 0  # CLIP-L pads with the end token, bigG with 0 (open_clip.tokenize, ComfyUI SDXLClipG)
LONG_WORD = 8  # words of fewer tokens move whole to the next chunk rather than being split (ComfyUI)
SGM_PREFIXES = {"clip_l": "conditioner.embedders.0.transformer.", "clip_g": "conditioner.embedders.1.model."}


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    act: str = "quick_gelu"  # "quick_gelu" (CLIP-L) or "gelu" (bigG, exact erf form)
    projection_dim: Optional[int] = None  # bigG's text_projection width; None for CLIP-L

    @classmethod
    def clip_l(cls) -> "TextEncoderConfig":
        """OpenAI CLIP ViT-L/14 text tower (SDXL TE1)."""
        return cls()

    @classmethod
    def bigg(cls) -> "TextEncoderConfig":
        """OpenCLIP ViT-bigG/14 text tower with projection (SDXL TE2, open_clip ViT-bigG-14.json)."""
        return cls(width=1280, layers=32, heads=20, mlp_width=5120, act="gelu", projection_dim=1280)

    @classmethod
    def tiny_l(cls) -> "TextEncoderConfig":
        return cls(width=32, layers=3, heads=2, mlp_width=128)

    @classmethod
    def tiny_g(cls) -> "TextEncoderConfig":
        # projection_dim != width so that a transposed text_projection cannot go unnoticed
        return cls(width=48, layers=3, heads=3, mlp_width=192, act="gelu", projection_dim=40)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], heads: Optional[int] = None,
                        act: Optional[str] = None) -> "TextEncoderConfig":
        """Infer from shapes; CLIP-L keys start with "text_model.", bigG keys are OpenCLIP's (no prefix).

        Head count and activation leave no trace in the shapes: heads defaults to width // 64 and act
        to the layout's SDXL value. Raises KeyError for a key every encoder of the layout has.
        """
        if "text_model.embeddings.token_embedding.weight" in sd:
            tok = sd["text_model.embeddings.token_embedding.weight"]
            pos = sd["text_model.embeddings.position_embedding.weight"]
            layers = _count(sd, r"text_model\.encoder\.layers\.(\d+)\.")
            mlp = sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
            projection_dim, default_act = None, "quick_gelu"
        else:
            tok, pos = sd["token_embedding.weight"], sd["positional_embedding"]
            layers = _count(sd, r"transformer\.resblocks\.(\d+)\.")
            mlp, default_act = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], "gelu"
            projection_dim = sd["text_projection"].shape[1]  # used as x @ P, so P is [width, out]
        width = tok.shape[1]
        return cls(vocab_size=tok.shape[0], max_positions=pos.shape[0], width=width, layers=layers,
                   heads=heads or width // 64, mlp_width=mlp, act=act or default_act, projection_dim=projection_dim)


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


# ---------------------------------------------------------------------------------------------- tokenizer

@functools.lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    return SimpleTokenizer()  # open_clip's bundled vocabulary file: offline


def word_tokens(prompt: str) -> list[list[int]]:
    """BPE ids of each whitespace-separated word, after open_clip's cleaning (ftfy, whitespace, lower)."""
    bpe = _bpe()
    words = []
    for word in bpe.clean_fn(prompt).split():
        ids = []
        for piece in bpe.pat.findall(word):  # same split, byte mapping and merges as SimpleTokenizer.encode
            piece = "".join(bpe.byte_encoder[b] for b in piece.encode("utf-8"))
            ids += [bpe.encoder[t] for t in bpe.bpe(piece).split(" ")]
        words.append(ids)
    return words


def chunk_tokens(prompt: str) -> list[list[int]]:
    """Split a prompt into chunks of at most 75 ids; a word under 8 tokens never straddles two chunks."""
    chunks, current = [], []
    for word in word_tokens(prompt):
        while word:
            room = CHUNK - len(current)
            if len(word) <= room:
                current, word = current + word, []
                continue
            if len(word) >= LONG_WORD or not current:  # long word: fill this chunk, carry the rest
                current, word = current + word[:room], word[room:]
            chunks.append(current)
            current = []
    if current or not chunks:
        chunks.append(current)
    return chunks


def tokenize(prompts: Sequence[str], pad_id: int, min_chunks: int = 1) -> Tensor:
    """Token ids [B, chunks, 77]: BOS + ids + EOS, then pad_id. Shorter prompts get empty chunks (A1111)."""
    per_prompt = [chunk_tokens(p) for p in prompts]
    n = max([min_chunks] + [len(c) for c in per_prompt])
    out = torch.full((len(prompts), n, CHUNK + 2), pad_id, dtype=torch.long)
    out[:, :, 0] = BOS
    for b, chunks in enumerate(per_prompt):
        chunks = chunks + [[]] * (n - len(chunks))
        for c, ids in enumerate(chunks):
            out[b, c, 1:len(ids) + 1] = torch.tensor(ids, dtype=torch.long)
            out[b, c, len(ids) + 1] = EOS
    return out


# ---------------------------------------------------------------------------------------------- encoders

class CLIPLTextEncoder(nn.Module):
    """CLIP ViT-L/14 (transformers' CLIPTextModel); keys "text_model.*"; returns hidden_states[-2] (no final norm)."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        assert config.projection_dim is None, "CLIP-L has no text projection in SDXL"
        self.config = config
        hf_config = CLIPTextConfig(
            vocab_size=config.vocab_size, hidden_size=config.width, intermediate_size=config.mlp_width,
            num_hidden_layers=config.layers, num_attention_heads=config.heads,
            max_position_embeddings=config.max_positions, hidden_act=config.act, layer_norm_eps=1e-5,
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD_L)
        model = CLIPTextModel(hf_config)
        # transformers 5 puts the text transformer at the top of CLIPTextModel, 4.x under .text_model;
        # either way our keys are "text_model.<HF text transformer keys>", as in the SGM file.
        self.text_model = getattr(model, "text_model", model)
        self.eval()

    def forward(self, ids: Tensor) -> Tensor:
        # explicit position ids: the non-persistent position_ids buffer may still be on the meta device
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        out = self.text_model(input_ids=ids, position_ids=positions, output_hidden_states=True)
        return out.hidden_states[-2]

    def rebuild_buffers(self) -> None:
        """Recreate the non-persistent position_ids buffer (left on meta by a meta build + assign load)."""
        emb = self.text_model.embeddings
        emb.position_ids = torch.arange(self.config.max_positions, device=emb.position_embedding.weight.device)[None]


class BigGTextEncoder(TextTransformer):
    """OpenCLIP ViT-bigG/14 text tower (open_clip's TextTransformer, so keys are exactly OpenCLIP's).

    forward(ids) -> (penultimate [N, 77, width] = input of the last resblock, no ln_final;
                     pooled [N, projection_dim] = ln_final(last)[argmax id] @ text_projection).
    """

    def __init__(self, config: TextEncoderConfig):
        if config.projection_dim is None:
            raise ValueError("bigG needs projection_dim (the width of text_projection)")
        act = {"gelu": nn.GELU, "quick_gelu": QuickGELU}[config.act]
        super().__init__(context_length=config.max_positions, vocab_size=config.vocab_size, width=config.width,
                         heads=config.heads, layers=config.layers, mlp_ratio=config.mlp_width / config.width,
                         output_dim=config.projection_dim, act_layer=act, norm_layer=LayerNorm)
        if self.transformer.resblocks[0].mlp.c_fc.out_features != config.mlp_width:
            raise ValueError(f"open_clip cannot build mlp_width={config.mlp_width} from width={config.width}")
        self.config = config
        self.eval()

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        # causal mask built here rather than taken from the attn_mask buffer, which may still be on meta
        mask = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu_(1)
        batch_first = getattr(self.transformer, "batch_first", False)  # open_clip < 2.26 runs [L, N, D]
        x = x if batch_first else x.transpose(0, 1)
        for block in self.transformer.resblocks[:-1]:
            x = block(x, attn_mask=mask)
        penultimate = x
        x = self.ln_final(self.transformer.resblocks[-1](x, attn_mask=mask))
        if not batch_first:
            penultimate, x = penultimate.transpose(0, 1), x.transpose(0, 1)
        eot = x[torch.arange(x.shape[0], device=x.device), ids.argmax(-1)]  # EOT has the largest id
        return penultimate, eot @ self.text_projection

    def rebuild_buffers(self) -> None:
        """Recreate the non-persistent causal attn_mask buffer on the parameters' device."""
        self.attn_mask = self.build_causal_mask().to(self.positional_embedding.device)


# ---------------------------------------------------------------------------------------------- SDXL

class SDXLTextEncoder(nn.Module):
    """Both SDXL text encoders; state-dict keys "clip_l.*" / "clip_g.*" map to SGM_PREFIXES."""

    def __init__(self, l_config: TextEncoderConfig, g_config: TextEncoderConfig):
        super().__init__()
        self.clip_l = CLIPLTextEncoder(l_config)
        self.clip_g = BigGTextEncoder(g_config)

    @classmethod
    def sdxl(cls) -> "SDXLTextEncoder":
        return cls(TextEncoderConfig.clip_l(), TextEncoderConfig.bigg())

    @classmethod
    def tiny(cls) -> "SDXLTextEncoder":
        return cls(TextEncoderConfig.tiny_l(), TextEncoderConfig.tiny_g())

    def rebuild_buffers(self) -> None:
        """Call after building on meta and loading with assign=True: recreates non-persistent buffers."""
        self.clip_l.rebuild_buffers()
        self.clip_g.rebuild_buffers()

    @torch.no_grad()  # no_grad rather than inference_mode: callers may reuse the tensors under autograd
    def encode(self, prompts: Sequence[str], zero_if_empty: bool = False,
               min_chunks: int = 1) -> tuple[Tensor, Tensor]:
        """(context [B, 77*chunks, 2048], pooled [B, 1280]) in the encoders' dtype.

        Prompts over 75 tokens are encoded in 75-token chunks concatenated along the sequence; all prompts
        of the batch get the same chunk count (at least min_chunks) by appending empty chunks ("" encoded).
        Pooled comes from the first chunk. zero_if_empty: blank prompts give all-zero context and pooled
        (diffusers force_zeros_for_empty_prompt, SGM force_uc_zero_embeddings).
        """
        if isinstance(prompts, str):
            raise ValueError("encode takes a list of prompts, got a single string")
        ids_l, ids_g = tokenize(prompts, PAD_L, min_chunks), tokenize(prompts, PAD_G, min_chunks)
        batch, chunks, n = ids_l.shape
        weight = self.clip_l.text_model.embeddings.token_embedding.weight
        device = weight.device
        if zero_if_empty and not any(p.strip() for p in prompts):
            # all blank: zero by definition, so the encoders need not run (the uncond half of every conditioning
            # when negative_prompt is None: half of that call's text work)
            width = self.clip_l.config.width + self.clip_g.config.width
            return (torch.zeros(batch, chunks * n, width, device=device, dtype=weight.dtype),
                    torch.zeros(batch, self.clip_g.config.projection_dim, device=device, dtype=weight.dtype))
        hidden_l = self.clip_l(ids_l.view(-1, n).to(device))
        hidden_g, pooled = self.clip_g(ids_g.view(-1, n).to(self.clip_g.positional_embedding.device))
        hidden_g, pooled = hidden_g.to(hidden_l), pooled.to(hidden_l)  # same device and dtype as CLIP-L's
        context = torch.cat([hidden_l, hidden_g], -1).reshape(batch, chunks * n, -1)
        pooled = pooled.view(batch, chunks, -1)[:, 0]
        if zero_if_empty:
            keep = torch.tensor([bool(p.strip()) for p in prompts], device=device)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        return context, pooled


def sdxl_vector(pooled: Tensor, original_size: tuple[int, int], crop_top_left: tuple[int, int] = (0, 0),
                target_size: Optional[tuple[int, int]] = None, embed_dim: int = 256) -> Tensor:
    """SDXL's "y": [pooled ‖ E(orig_h) ‖ E(orig_w) ‖ E(crop_top) ‖ E(crop_left) ‖ E(tgt_h) ‖ E(tgt_w)].

    E is the cos-first sinusoidal embedding (SGM ConcatTimestepEmbedderND, max_period 10000); sizes are
    in pixels as (height, width); target_size defaults to original_size. 1280 + 6*256 = 2816 for SDXL.
    """
    target_size = original_size if target_size is None else target_size
    ids = torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32, device=pooled.device)
    if ids.numel() != 6:
        raise ValueError(f"sizes must be (height, width) pairs, got {original_size}, {crop_top_left}, {target_size}")
    sizes = timestep_embedding(ids, embed_dim).reshape(1, -1).to(pooled.dtype)
    return torch.cat([pooled, sizes.expand(pooled.shape[0], -1)], dim=-1)
