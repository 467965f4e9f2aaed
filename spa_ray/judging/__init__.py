"""Preference judges. `implicit_reward` is SPA's direct preference judgment (Eq. 7-8);
`reward_model` and `llm_judge` are the paper's swapped judges (Table 2), pure math here;
`judge_models` trains, saves and loads their models (the one module here with I/O)."""

from .implicit_reward import PairLabels, implicit_reward, label_pairs
from .llm_judge import judge_prompt, judge_sft_examples, option_logprobs, two_order_rewards
from .reward_model import bradley_terry_loss, last_token_scores, scalar_rewards

__all__ = [
    "PairLabels",
    "bradley_terry_loss",
    "implicit_reward",
    "judge_prompt",
    "judge_sft_examples",
    "label_pairs",
    "last_token_scores",
    "option_logprobs",
    "scalar_rewards",
    "two_order_rewards",
]
