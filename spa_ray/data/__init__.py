"""Data layer: preference records, UltraFeedback loading, splits, chat templates,
tokenisation with response masks, and collation. ``datasets`` is imported lazily (only
when a file is loaded); ``collate`` imports torch."""

from .collate import bucket_by_length, collate_preference_pairs, collate_prompts, pad_sequences
from .errors import DataError
from .records import PreferencePair, PromptRecord, prompt_id, prompt_key
from .splits import DataSplits, SplitConfig, SplitSizes, assert_disjoint, load_user_splits, split_pairs, split_sizes
from .tokenize import (
    ZEPHYR_CHAT_TEMPLATE,
    TokenizedPair,
    TokenizedSequence,
    encode_prompt,
    encode_response,
    ensure_chat_template,
    tokenize_pair,
    tokenize_preference_pair,
    tokenize_prompts,
)
from .ultrafeedback import LoadedPairs, LoadedPrompts, LoadStats, load_prompts, load_ultrafeedback, pairs_from_rows

__all__ = [
    "DataError",
    "PreferencePair",
    "PromptRecord",
    "prompt_key",
    "prompt_id",
    "load_ultrafeedback",
    "load_prompts",
    "pairs_from_rows",
    "LoadedPairs",
    "LoadedPrompts",
    "LoadStats",
    "SplitConfig",
    "SplitSizes",
    "DataSplits",
    "split_pairs",
    "split_sizes",
    "assert_disjoint",
    "load_user_splits",
    "ZEPHYR_CHAT_TEMPLATE",
    "TokenizedSequence",
    "TokenizedPair",
    "ensure_chat_template",
    "encode_prompt",
    "encode_response",
    "tokenize_pair",
    "tokenize_preference_pair",
    "tokenize_prompts",
    "pad_sequences",
    "collate_preference_pairs",
    "collate_prompts",
    "bucket_by_length",
]
