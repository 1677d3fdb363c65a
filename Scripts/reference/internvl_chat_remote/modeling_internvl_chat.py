"""Stand-in for the `modeling_internvl_chat.py` InternVL2 checkpoints ship as remote code,
with the interface the calibration exporter uses and the released checkpoints' tensor
names: `InternVLChatModel` holds `vision_model` (a ViT whose first token is CLS),
`mlp1` (LayerNorm, Linear, GELU, Linear) and `language_model` (InternLM2 from
modeling_internlm2.py, our port, or transformers' Qwen2/Llama); `extract_feature`
drops CLS, pixel-shuffles the patch grid by `downsample_ratio` and projects;
`num_image_token` is the image tokens per 448-px tile (256 for InternVL2: (448/14)² ×
0.5²); `template` / `system_message` name the chat template of conversation.py.
`forward` puts the image features at the `<IMG_CONTEXT>` tokens (`img_context_token_id`)
and returns the logits. Written for the offline tests; not the published code.
"""
import torch
from torch import nn
from transformers import PreTrainedModel

from .configuration_internvl_chat import InternVLChatConfig
from .conversation import get_conv_template  # noqa: F401  (what the released chat() uses)
from .modeling_internlm2 import InternLM2ForCausalLM


class InternVisionEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(1, 1, c.hidden_size))
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, c.patch_size)
        n = (c.image_size // c.patch_size) ** 2
        self.position_embedding = nn.Parameter(torch.randn(1, n + 1, c.hidden_size))

    def forward(self, pixel_values):
        # pixel_values: [B, 3, S, S] -> [B, 1 + (S/p)², C]
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], 1) + self.position_embedding


class InternAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.num_attention_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) / (c // self.heads) ** 0.5, -1)
        return self.proj((probs @ v).transpose(1, 2).reshape(b, t, c))


class InternMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class InternVisionLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = InternAttention(c)
        self.ls1 = nn.Parameter(torch.full((c.hidden_size,), 0.5))
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = InternMLP(c)
        self.ls2 = nn.Parameter(torch.full((c.hidden_size,), 0.5))

    def forward(self, x):
        x = x + self.attn(self.norm1(x)) * self.ls1
        return x + self.mlp(self.norm2(x)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList([InternVisionLayer(c) for _ in range(c.num_hidden_layers)])


class InternVisionModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = InternVisionEmbeddings(config)
        self.encoder = InternVisionEncoder(config)

    def forward(self, pixel_values):
        # -> last hidden state [B, 1 + N, C]
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            x = layer(x)
        return x


def language_model_for(llm_config):
    arch = (getattr(llm_config, "architectures", None) or ["InternLM2ForCausalLM"])[0]
    if arch == "InternLM2ForCausalLM":
        return InternLM2ForCausalLM(llm_config.to_dict())
    import transformers
    cls = {"Qwen2ForCausalLM": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
           "LlamaForCausalLM": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[arch]
    return cls[1](cls[0](**{k: v for k, v in llm_config.to_dict().items() if k not in ("architectures", "model_type")}))


class InternVLChatModel(PreTrainedModel):
    config_class = InternVLChatConfig
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        v = config.vision_config
        image_size = config.force_image_size or v.image_size
        self.template = config.template
        self.system_message = "You are a helpful assistant that describes pictures."
        self.downsample_ratio = config.downsample_ratio
        self.ps_version = config.ps_version
        self.num_image_token = int((image_size // v.patch_size) ** 2 * (config.downsample_ratio ** 2))
        self.vision_model = InternVisionModel(v)
        self.language_model = language_model_for(config.llm_config)
        shuffled = v.hidden_size * int(1 / config.downsample_ratio) ** 2
        llm_hidden = config.llm_config.hidden_size
        self.mlp1 = nn.Sequential(nn.LayerNorm(shuffled), nn.Linear(shuffled, llm_hidden), nn.GELU(),
                                  nn.Linear(llm_hidden, llm_hidden))
        self.img_context_token_id = None

    def pixel_shuffle(self, x, scale):
        # x: [B, W, H, C] -> [B, W·scale, H·scale, C/scale²] (neighbouring patches stacked
        # along channels)
        n, w, h, c = x.shape
        x = x.reshape(n, w, int(h * scale), int(c / scale))
        x = x.permute(0, 2, 1, 3).contiguous()
        x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
        if self.ps_version != "v1":
            x = x.permute(0, 2, 1, 3).contiguous()
        return x

    def extract_feature(self, pixel_values):
        # pixel_values: [tiles, 3, S, S] -> [tiles, num_image_token, llm hidden]
        x = self.vision_model(pixel_values)[:, 1:, :]
        side = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], side, side, -1)
        x = self.pixel_shuffle(x, self.downsample_ratio)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        return self.mlp1(x)

    def forward(self, pixel_values, input_ids, attention_mask=None):
        # input_ids: [B, T] with num_image_token × tiles <IMG_CONTEXT> ids -> logits [B, T, vocab]
        embed = self.language_model.get_input_embeddings()
        emb = embed(input_ids).clone()
        selected = input_ids == self.img_context_token_id
        emb[selected] = self.extract_feature(pixel_values).reshape(-1, emb.shape[-1]).to(emb.dtype)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = torch.arange(input_ids.shape[1])[None].expand_as(input_ids)
        return self.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=positions).logits
