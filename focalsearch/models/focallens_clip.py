"""FocalLens-CLIP: a CLIP whose vision tower also attends to instruction tokens (design §2)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPConfig, CLIPModel


class FocalLensCLIPConfig(CLIPConfig):
    """A CLIP config plus the fields that describe the instruction conditioning."""

    model_type = "focallens_clip"

    instruction_max_length: int = 32
    instruction_init_std: float = 0.02


class FocalLensCLIPModel(CLIPModel):
    """CLIP with a learned projection that appends instruction tokens to the ViT's sequence.

    The weight names of the CLIP parts are CLIP's own, so a base checkpoint loads into this
    model unchanged and only ``instruction_projection`` is new.
    """

    config_class = FocalLensCLIPConfig
    config: FocalLensCLIPConfig

    def __init__(self, config: FocalLensCLIPConfig):
        super().__init__(config)
        self.instruction_projection = nn.Linear(
            config.text_config.hidden_size, config.vision_config.hidden_size
        )
        nn.init.normal_(self.instruction_projection.weight, std=config.instruction_init_std)
        nn.init.zeros_(self.instruction_projection.bias)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is getattr(self, "instruction_projection", None):
            nn.init.normal_(module.weight, std=self.config.instruction_init_std)
            nn.init.zeros_(module.bias)

    def instruction_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-token text hidden states of the instruction, projected to the vision width."""
        hidden = self.text_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.instruction_projection(hidden)

    def conditional_image_features(
        self,
        pixel_values: torch.Tensor,
        instruction_tokens: torch.Tensor | None = None,
        instruction_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected class-token features of images under instructions (not normalised).

        ``instruction_tokens`` is (B or 1, T, vision width); ``instruction_mask`` (B or 1, T) marks
        real tokens with 1. With no tokens this is exactly CLIP's image feature.
        """
        vision = self.vision_model
        hidden = vision.embeddings(pixel_values)
        additive_mask = None
        if instruction_tokens is not None and instruction_tokens.shape[1] > 0:
            batch, n_image_tokens = hidden.shape[0], hidden.shape[1]
            tokens = instruction_tokens.to(hidden.dtype).expand(batch, -1, -1)
            hidden = torch.cat([hidden, tokens], dim=1)
            if instruction_mask is not None and not bool(instruction_mask.all()):
                keep = torch.cat(
                    [
                        torch.ones(batch, n_image_tokens, dtype=torch.bool, device=hidden.device),
                        instruction_mask.to(device=hidden.device, dtype=torch.bool).expand(batch, -1),
                    ],
                    dim=1,
                )
                additive_mask = torch.zeros(keep.shape, dtype=hidden.dtype, device=hidden.device)
                additive_mask = additive_mask.masked_fill(~keep, torch.finfo(hidden.dtype).min)
                additive_mask = additive_mask[:, None, None, :]
        hidden = vision.pre_layrnorm(hidden)
        hidden = vision.encoder(inputs_embeds=hidden, attention_mask=additive_mask).last_hidden_state
        pooled = vision.post_layernorm(hidden[:, 0, :])
        return self.visual_projection(pooled)

    def text_embeddings(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected text features (not normalised), as CLIP's text tower gives them."""
        pooled = self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return self.text_projection(pooled)


AutoConfig.register(FocalLensCLIPConfig.model_type, FocalLensCLIPConfig)
AutoModel.register(FocalLensCLIPConfig, FocalLensCLIPModel)
