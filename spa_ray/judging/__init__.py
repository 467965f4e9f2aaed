"""Preference judges. `implicit_reward` is SPA's direct preference judgment (Eq. 7-8)."""

from .implicit_reward import PairLabels, implicit_reward, label_pairs

__all__ = ["PairLabels", "implicit_reward", "label_pairs"]
