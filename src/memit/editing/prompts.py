"""Tokenising prompts in batches and finding the subject's last token in each."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from memit.requests import subject_token_index


@dataclass
class PromptBatch:
    """Right-padded token ids with the subject's last-token position of each prompt."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    subject_positions: torch.Tensor
    lengths: torch.Tensor

    def model_inputs(self, device: torch.device | str) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids.to(device), "attention_mask": self.attention_mask.to(device)}


def tokenize_prompts(tok: PreTrainedTokenizerBase, templates: list[str], subjects: list[str]) -> PromptBatch:
    """Tokenise each ``template`` (one ``{}``) filled with its subject."""
    texts = [t.replace("{}", s, 1) for t, s in zip(templates, subjects)]
    encoded = tok(texts, padding=True, return_tensors="pt")
    positions = [subject_token_index(tok, t, s) for t, s in zip(templates, subjects)]
    return PromptBatch(
        encoded["input_ids"], encoded["attention_mask"], torch.tensor(positions), encoded["attention_mask"].sum(1)
    )


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a target (which carries its leading space) without special tokens."""
    return tok(target, add_special_tokens=False)["input_ids"]
