"""Stand-in for the `configuration_internvl_chat.py` InternVL2 checkpoints ship as remote
code: the fields the calibration exporter reads (vision_config, llm_config, template,
downsample_ratio, force_image_size and the dynamic-tiling settings), with the released
configs' names and defaults. Written for the offline tests; not the published code.
"""
from transformers import PretrainedConfig


class InternVLChatConfig(PretrainedConfig):
    model_type = "internvl_chat"

    def __init__(self, vision_config=None, llm_config=None, template="internlm2-chat", downsample_ratio=0.5,
                 force_image_size=None, select_layer=-1, ps_version="v2", dynamic_image_size=True, use_thumbnail=True,
                 min_dynamic_patch=1, max_dynamic_patch=12, **kwargs):
        super().__init__(**kwargs)
        # Sub-configs as config objects (the released code builds InternVisionConfig and
        # InternLM2Config / LlamaConfig / Qwen2Config here).
        self.vision_config = vision_config if isinstance(vision_config, PretrainedConfig) else PretrainedConfig(**(vision_config or {}))
        self.llm_config = llm_config if isinstance(llm_config, PretrainedConfig) else PretrainedConfig(**(llm_config or {}))
        self.template = template
        self.downsample_ratio = downsample_ratio
        self.force_image_size = force_image_size
        self.select_layer = select_layer
        self.ps_version = ps_version
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch

    def to_dict(self):
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
