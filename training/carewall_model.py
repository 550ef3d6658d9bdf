"""The classifier graph and the input encoding shared by training, export and parity.

The encoder is a plain re-implementation of BERT (the layout of multilingual-e5-small)
so the exported ONNX graph contains only ordinary ops and does not depend on how a
given `transformers` release builds attention masks; `load_bert_weights` takes the
weights of the converted Hugging Face checkpoint and `tests` compare both.

Input contract (models/README.md): ids = [cls] + context[-k:] + [sep, sep] +
response[:max_response_tokens] + [sep]; token_type_ids 0 up to and including the two
separators, 1 for the response and its closing [sep], 0 for padding. The encoder
itself always uses token type 0 (as e5 was trained); token types only tell the head
which tokens are the context and which the response.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# The input contract lives in encoding.py (torch-free, mirrored by the Rust side).
from encoding import (LABELS, SAFE, Contract, aggregate, encode_pair, encode_pairs,  # noqa: E402,F401
                      encode_windows)


def pad_batch(rows: list[tuple[list[int], list[int]]], pad_id: int):
    n = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    tt = torch.zeros((len(rows), n), dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a)] = torch.tensor(a)
        mask[i, : len(a)] = 1
        tt[i, : len(b)] = torch.tensor(b)
    return ids, mask, tt


class Layer(nn.Module):
    def __init__(self, H: int, NH: int, FF: int, eps: float):
        super().__init__()
        self.nh = NH
        self.q, self.k, self.v, self.o = (nn.Linear(H, H) for _ in range(4))
        self.ln1 = nn.LayerNorm(H, eps=eps)
        self.fi = nn.Linear(H, FF)
        self.fo = nn.Linear(FF, H)
        self.ln2 = nn.LayerNorm(H, eps=eps)

    def forward(self, x, bias):
        B, T, H = x.shape
        hd = H // self.nh

        def heads(t):
            return t.view(B, T, self.nh, hd).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        att = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(hd)) + bias
        ctx = torch.matmul(att.softmax(-1), v).transpose(1, 2).reshape(B, T, H)
        x = self.ln1(x + self.o(ctx))
        return self.ln2(x + self.fo(F.gelu(self.fi(x))))


class Encoder(nn.Module):
    def __init__(self, vocab: int, H=384, NL=12, NH=12, FF=1536, maxp=512, eps=1e-12):
        super().__init__()
        self.word = nn.Embedding(vocab, H)
        self.pos = nn.Embedding(maxp, H)
        self.type0 = nn.Parameter(torch.zeros(H))
        self.ln = nn.LayerNorm(H, eps=eps)
        self.layers = nn.ModuleList(Layer(H, NH, FF, eps) for _ in range(NL))

    def forward(self, input_ids, attention_mask):
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.ln(self.word(input_ids) + self.pos(pos)[None] + self.type0)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        for layer in self.layers:
            x = layer(x, bias)
        return x


def load_bert_weights(enc: Encoder, sd: dict, num_layers: int):
    m = {"word.weight": "embeddings.word_embeddings.weight",
         "pos.weight": "embeddings.position_embeddings.weight",
         "ln.weight": "embeddings.LayerNorm.weight", "ln.bias": "embeddings.LayerNorm.bias"}
    new = {k: sd[v] for k, v in m.items()}
    new["type0"] = sd["embeddings.token_type_embeddings.weight"][0]
    names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
             "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
             "fi": "intermediate.dense", "fo": "output.dense", "ln2": "output.LayerNorm"}
    for l in range(num_layers):
        for a, b in names.items():
            for p in ("weight", "bias"):
                new[f"layers.{l}.{a}.{p}"] = sd[f"encoder.layer.{l}.{b}.{p}"]
    enc.load_state_dict(new)


def load_encoder(ckpt: Path, num_layers: int) -> Encoder:
    from safetensors.torch import load_file

    cfg = json.loads((ckpt / "config.json").read_text())
    sd = {k: v.float() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    enc = Encoder(cfg["vocab_size"], cfg["hidden_size"], num_layers, cfg["num_attention_heads"],
                  cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["layer_norm_eps"])
    load_bert_weights(enc, sd, num_layers)
    return enc


def masked_mean(h, m):
    m = m.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


def masked_max(h, m):
    """Max over the positions where m is 1 (0 where none is)."""
    m = m.to(h.dtype).unsqueeze(-1)
    return (h * m - (1.0 - m) * 1e4).amax(1) * (m.sum(1) > 0).to(h.dtype)


class Head(nn.Module):
    """Pools context and response separately and looks at how they relate.

    Annotators judged whether the reply engages with what the seeker just said, so the
    features are: [cls], mean(response), mean(context), a recency-weighted context mean
    (the seeker's latest turn dominates), product and difference of response and recent
    context, two cosines, the share of response tokens that also occur in the context
    (parroting vs engagement) and log response length. A shared trunk feeds the 8-class
    output and an auxiliary "is this the true next turn" output trained on SmileChat.
    A lexical branch (a learned bag of response tokens) adds its own logits: generic
    openers and filler are word-level cues that mean pooling blurs.
    """

    def __init__(self, H: int, vocab: int, hidden: int = 256, lex_dim: int = 32, n_cls: int = 8,
                 dropout: float = 0.1, recency: float = 24.0, lex_bigrams: int = 0, local_dim: int = 0):
        super().__init__()
        self.recency = recency
        self.vocab = vocab
        self.lex_bigrams = lex_bigrams
        # Max-pooled features over the response tokens (model v2): one harmful sentence in a
        # long, otherwise warm window must not be averaged away.
        self.local_dim = local_dim
        if local_dim:
            self.local = nn.Linear(H, local_dim)
            self.lex_max_out = nn.Linear(lex_dim, n_cls)
        self.trunk = nn.Sequential(nn.Dropout(dropout), nn.Linear(6 * H + 4 + local_dim, hidden), nn.GELU(),
                                   nn.Dropout(dropout))
        self.out = nn.Linear(hidden, n_cls)
        self.aux = nn.Linear(hidden, 1)
        # Rows beyond `vocab` hold hashed response token bigrams (when lex_bigrams > 0).
        self.lex = nn.Embedding(vocab + lex_bigrams, lex_dim)
        nn.init.normal_(self.lex.weight, std=0.02)
        self.lex_out = nn.Linear(lex_dim, n_cls)
        self.register_buffer("inv_temperature", torch.ones(()))

    def features(self, h, input_ids, attention_mask, token_type_ids):
        am = attention_mask.to(h.dtype)
        tt = token_type_ids.to(h.dtype)
        rm = tt * am
        cm = (1.0 - tt) * am
        pos = torch.arange(h.shape[1], device=h.device, dtype=h.dtype).unsqueeze(0)
        last = cm.sum(1, keepdim=True) - 3.0  # [cls] ctx... [sep][sep]: last context position
        ctx_only = ((pos >= 1.0) & (pos <= last)).to(h.dtype)
        w = torch.exp(-(last - pos).clamp(min=0.0) / self.recency) * ctx_only
        r, c, cr = masked_mean(h, rm), masked_mean(h, ctx_only), masked_mean(h, w)
        cos1 = F.cosine_similarity(r, c, dim=-1, eps=1e-6).unsqueeze(-1)
        cos2 = F.cosine_similarity(r, cr, dim=-1, eps=1e-6).unsqueeze(-1)
        same = (input_ids.unsqueeze(2) == input_ids.unsqueeze(1)).to(h.dtype)  # [B,T,T]
        in_ctx = (same * ctx_only.unsqueeze(1)).amax(-1)  # response token also in context
        overlap = (in_ctx * rm).sum(1, keepdim=True) / rm.sum(1, keepdim=True).clamp(min=1.0)
        rlen = torch.log1p(rm.sum(1, keepdim=True))
        parts = [h[:, 0], r, c, cr, r * cr, r - cr, cos1, cos2, overlap, rlen]
        if self.local_dim:
            parts.append(masked_max(F.gelu(self.local(h)), rm))
        feats = torch.cat(parts, dim=-1)
        return feats, rm

    def forward(self, h, input_ids, attention_mask, token_type_ids, with_aux: bool = False):
        feats, rm = self.features(h, input_ids, attention_mask, token_type_ids)
        z = self.trunk(feats)
        if self.lex_bigrams:
            big = (input_ids[:, :-1] * 7919 + input_ids[:, 1:]) % self.lex_bigrams + self.vocab
            lex_ids = torch.cat([input_ids, big], 1)
            lex_m = torch.cat([rm, rm[:, :-1] * rm[:, 1:]], 1)
        else:
            lex_ids, lex_m = input_ids, rm
        emb = self.lex(lex_ids)
        lex = masked_mean(emb, lex_m)
        logits = self.out(z) + self.lex_out(lex)
        if self.local_dim:
            logits = logits + self.lex_max_out(masked_max(emb, lex_m))
        logits = logits * self.inv_temperature
        if with_aux:
            return logits, self.aux(z).squeeze(-1)
        return logits


class Classifier(nn.Module):
    def __init__(self, enc: Encoder, head: Head):
        super().__init__()
        self.enc = enc
        self.head = head

    def forward(self, input_ids, attention_mask, token_type_ids, with_aux: bool = False):
        h = self.enc(input_ids, attention_mask)
        return self.head(h, input_ids, attention_mask, token_type_ids, with_aux)
