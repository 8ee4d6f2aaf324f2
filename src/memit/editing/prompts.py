"""Tokenising prompts in batches: finding the subject's last token in each (the last token
that overlaps the subject, which may run past it), and prompts followed by the target
tokens whose likelihood a method raises."""
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


@dataclass
class TargetBatch:
    """Prompt + target token ids, right-padded, and where each target token is predicted."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor  # per target token: its sequence
    positions: torch.Tensor  # position whose logits predict it
    tokens: torch.Tensor
    n_sequences: int

    @classmethod
    def of(cls, tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], device: torch.device | str) -> "TargetBatch":
        """From (prompt text, target with its leading space) pairs."""
        sequences, rows, positions, tokens = [], [], [], []
        for row, (prompt, target) in enumerate(pairs):
            prompt_ids, new_ids = tok(prompt)["input_ids"], target_ids(tok, target)
            sequences.append(prompt_ids + new_ids)
            for offset, token in enumerate(new_ids):
                rows.append(row)
                positions.append(len(prompt_ids) - 1 + offset)
                tokens.append(token)
        # Right padding keeps every token at its unpadded position.
        padded = tok.pad({"input_ids": sequences}, padding=True, padding_side="right", return_tensors="pt")
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return cls(
            {"input_ids": padded["input_ids"].to(device), "attention_mask": padded["attention_mask"].to(device)},
            as_tensor(rows), as_tensor(positions), as_tensor(tokens), len(pairs),
        )

    def nll(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over sequences of the mean per-token NLL of the target after the prompt."""
        log_probs = torch.log_softmax(logits[self.rows, self.positions].float(), dim=-1)
        token_nll = -log_probs.gather(1, self.tokens.unsqueeze(1)).squeeze(1)
        per_sequence = torch.zeros(self.n_sequences, device=token_nll.device).index_add(0, self.rows, token_nll)
        counts = torch.bincount(self.rows, minlength=self.n_sequences).float()
        return (per_sequence / counts).mean()
