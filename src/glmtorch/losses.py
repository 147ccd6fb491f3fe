"""The heads' losses, with the reference's semantics (transformers `loss_utils`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None = None,
                   ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t + 1]; `ignore_index` labels count for nothing.

    With `num_items_in_batch` the summed loss is divided by it (gradient accumulation over micro-batches
    then weighs every token equally); otherwise it is the mean over counted tokens.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must have shape {tuple(logits.shape[:2])} (batch, seq) to match the logits; "
                         f"got {tuple(labels.shape)} (with logits_to_keep, labels must match the kept positions)")
    shifted = F.pad(labels, (0, 1), value=ignore_index)[:, 1:].to(logits.device)
    return _cross_entropy(logits.float().flatten(0, 1), shifted.flatten(), num_items_in_batch, ignore_index)


def token_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return _cross_entropy(logits.float().flatten(0, -2), labels.flatten().to(logits.device), None, IGNORE_INDEX)


def sequence_classification_loss(pooled: torch.Tensor, labels: torch.Tensor, num_labels: int,
                                 problem_type: str | None) -> torch.Tensor:
    """Regression for one label, single-label for integer labels, multi-label otherwise (unless the config
    names the problem type)."""
    labels = labels.to(pooled.device)
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(pooled.squeeze(), labels.squeeze().to(pooled.dtype))
        return F.mse_loss(pooled, labels.to(pooled.dtype))
    if problem_type == "single_label_classification":
        return _cross_entropy(pooled.view(-1, num_labels), labels.view(-1), None, IGNORE_INDEX)
    return F.binary_cross_entropy_with_logits(pooled, labels.to(pooled.dtype))


def _cross_entropy(logits, target, num_items_in_batch, ignore_index):
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index)
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / num_items_in_batch
