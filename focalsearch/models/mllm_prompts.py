"""The prompts an MLLM-family encoder reads (design §2, FocalLens-MLLM); importable without torch.

The prompts are part of a condition: vectors made under other prompts are other vectors, so the
templates are recorded in the catalog with the model and encoder, and an index refuses to mix them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

INSTRUCTION_SLOT = "{instruction}"
TEXT_SLOT = "{text}"


@dataclass(frozen=True)
class PromptTemplates:
    """The user turn of each kind of request; the checkpoint's chat template wraps it.

    ``image``: after the image, for a conditional embedding ({instruction} is filled in);
    ``unconditional``: after the image, when the instruction is empty;
    ``text``: a text query or answer alone ({text} is filled in).
    Each ends in an ask for a one-word answer: the final state of the prompt's last token is then
    a summary of that answer (the E5-V observation), and the two kinds of prompt meet there.
    """

    image: str = "{instruction}\nAnswer in one word."
    unconditional: str = "Describe the image in one word."
    text: str = "{text}\nSummarize the above in one word."

    def __post_init__(self):
        if INSTRUCTION_SLOT not in self.image:
            raise ValueError(f"the image prompt must hold {INSTRUCTION_SLOT}")
        if TEXT_SLOT not in self.text:
            raise ValueError(f"the text prompt must hold {TEXT_SLOT}")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict | None) -> PromptTemplates:
        return cls(**(data or {}))

    def fingerprint(self) -> str:
        """A short stable hash of the templates, so that vectors made under other prompts are another condition."""
        return hashlib.sha1(self.to_json().encode()).hexdigest()[:8]

    def image_prompt(self, instruction: str) -> str:
        return self.image.replace(INSTRUCTION_SLOT, instruction) if instruction else self.unconditional

    def text_prompt(self, text: str) -> str:
        return self.text.replace(TEXT_SLOT, text)


DEFAULT_TEMPLATES = PromptTemplates()
