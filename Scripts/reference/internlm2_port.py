"""InternLM2's language model as InternVL2 ships it (the `internvl_chat` checkpoints'
remote code, modeling_internlm2.py), ported for the reference fixtures: transformers has
no InternLM2 class. Only what a forward and backward on inputs_embeds needs: the decoder
layer (RMSNorm, RoPE with optional dynamic NTK scaling, GQA attention from the fused
`wqkv`, SwiGLU `w1`/`w3`/`w2`), the final norm and the `output` head. Eager attention with
causal and padding masks, softmax in fp32, as the published code's eager path computes.

Shapes: hidden [B, T, C]; wqkv rows are [kv_heads, groups + 2, head_dim]: per KV head
its `groups` query heads, then its key head, then its value head.
"""
import torch
import torch.nn.functional as F
from torch import nn


class InternLM2RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * h.to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


class InternLM2Rotary(nn.Module):
    """Default RoPE; with rope_scaling {type: dynamic} the base grows once the sequence
    (max position + 1) passes max_position_embeddings (dynamic NTK)."""

    def __init__(self, dim, max_positions, base, scaling=None):
        super().__init__()
        self.dim, self.max_positions, self.base = dim, max_positions, base
        self.scaling = scaling

    def forward(self, position_ids):
        base = self.base
        seq_len = int(position_ids.max()) + 1
        if self.scaling and self.scaling["type"] == "dynamic" and seq_len > self.max_positions:
            f = self.scaling["factor"]
            base = base * ((f * seq_len / self.max_positions) - (f - 1)) ** (self.dim / (self.dim - 2))
        inv_freq = 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim))
        freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()          # [B, T, D]


class InternLM2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg["num_attention_heads"]
        self.kv_heads = cfg["num_key_value_heads"]
        self.head_dim = cfg["hidden_size"] // self.num_heads
        self.groups = self.num_heads // self.kv_heads
        self.wqkv = nn.Linear(cfg["hidden_size"], (self.num_heads + 2 * self.kv_heads) * self.head_dim, bias=cfg["bias"])
        self.wo = nn.Linear(self.num_heads * self.head_dim, cfg["hidden_size"], bias=cfg["bias"])

    def forward(self, h, mask_bias, cos, sin):
        b, t, _ = h.shape
        qkv = self.wqkv(h).view(b, t, self.kv_heads, self.groups + 2, self.head_dim)   # "b q (h gs d) -> b q h gs d"
        q = qkv[..., : self.groups, :].reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k[:, :, None].expand(b, self.kv_heads, self.groups, t, self.head_dim).reshape(b, self.num_heads, t, self.head_dim)
        v = v[:, :, None].expand(b, self.kv_heads, self.groups, t, self.head_dim).reshape(b, self.num_heads, t, self.head_dim)
        scores = q @ k.transpose(2, 3) / self.head_dim ** 0.5 + mask_bias
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
        return self.wo(out)


class InternLM2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        c, i = cfg["hidden_size"], cfg["intermediate_size"]
        self.w1 = nn.Linear(c, i, bias=False)
        self.w3 = nn.Linear(c, i, bias=False)
        self.w2 = nn.Linear(i, c, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = InternLM2Attention(cfg)
        self.feed_forward = InternLM2MLP(cfg)
        self.attention_norm = InternLM2RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.ffn_norm = InternLM2RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])

    def forward(self, h, mask_bias, cos, sin):
        h = h + self.attention(self.attention_norm(h), mask_bias, cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Output:
    def __init__(self, last_hidden_state):
        self.last_hidden_state = last_hidden_state


class InternLM2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList([InternLM2DecoderLayer(cfg) for _ in range(cfg["num_hidden_layers"])])
        self.norm = InternLM2RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.rotary = InternLM2Rotary(cfg["hidden_size"] // cfg["num_attention_heads"], cfg["max_position_embeddings"],
                                      cfg["rope_theta"], cfg.get("rope_scaling"))

    def forward(self, inputs_embeds, attention_mask, position_ids, use_cache=False):
        b, t, _ = inputs_embeds.shape
        # Causal and padding masks as an additive bias of the dtype's minimum (what the
        # published code's _prepare_4d_causal_attention_mask builds).
        allowed = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & attention_mask.bool()[:, None, :]
        bias = torch.zeros(b, 1, t, t)
        bias.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        cos, sin = self.rotary(position_ids)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, bias, cos, sin)
        return Output(self.norm(h))


class Logits:
    def __init__(self, logits):
        self.logits = logits


class InternLM2ForCausalLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = InternLM2Model(cfg)
        self.output = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def forward(self, inputs_embeds, attention_mask, position_ids):
        # inputs_embeds: [B, T, C] -> .logits [B, T, vocab]
        return Logits(self.output(self.model(inputs_embeds, attention_mask, position_ids).last_hidden_state))
