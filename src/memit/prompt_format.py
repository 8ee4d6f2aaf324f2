"""How evaluation prompts reach the model: as the data set writes them (``raw``), or as a
user turn of the model's chat template (``chat``), which is how an instruction-tuned model
is asked questions when it is deployed."""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from memit.errors import InputError

RAW_NAME = "raw"
CHAT_NAME = "chat"


@dataclass(frozen=True)
class PromptFormat:
    """Turns a data set's prompt into model input, and a target into its continuation."""

    name: str = RAW_NAME
    tok: PreTrainedTokenizerBase | None = field(default=None, compare=False, repr=False)
    # A BOS the template writes and scoring's tokenizer adds again, to drop from the text.
    duplicate_bos: str = ""

    @property
    def is_chat(self) -> bool:
        return self.name == CHAT_NAME

    def prompt(self, text: str) -> str:
        if not self.is_chat:
            return text
        rendered = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return rendered.removeprefix(self.duplicate_bos) if self.duplicate_bos else rendered

    def continuation(self, target: str) -> str:
        """A target continues a raw prompt after a space; an assistant turn starts without one."""
        return target.lstrip() if self.is_chat else target


RAW = PromptFormat()


def prompt_format(tok: PreTrainedTokenizerBase, chat_template: bool) -> PromptFormat:
    """The raw format, or the chat format of ``tok`` (which must have a chat template)."""
    if not chat_template:
        return RAW
    if not getattr(tok, "chat_template", None):
        raise InputError("chat_template: this model's tokenizer has no chat template; evaluate raw prompts instead")
    # Scoring tokenizes the text again with special tokens on; a BOS written by the template
    # would then appear twice.
    ids = tok("a")["input_ids"]
    adds_bos = bool(ids) and tok.bos_token is not None and ids[0] == tok.bos_token_id
    return PromptFormat(CHAT_NAME, tok, tok.bos_token if adds_bos else "")


__all__ = ["CHAT_NAME", "RAW", "RAW_NAME", "PromptFormat", "prompt_format"]
