"""SPA math in pure torch (no Ray, no I/O): log-probs, DPO, refined loss, noise detection."""

from .confidence_window import ConfidenceWindow
from .distributed import all_gather_1d
from .dpo import dpo_loss, dpo_margin
from .logprobs import response_lengths, sequence_logprobs, token_logprobs
from .noise_detection import decoupled_confidence, extrapolated_sequence_logprobs, lambda_for_iteration
from .refined import refined_dpo_loss

__all__ = [
    "ConfidenceWindow",
    "all_gather_1d",
    "decoupled_confidence",
    "dpo_loss",
    "dpo_margin",
    "extrapolated_sequence_logprobs",
    "lambda_for_iteration",
    "refined_dpo_loss",
    "response_lengths",
    "sequence_logprobs",
    "token_logprobs",
]
