"""Reference computations shared by the variant tests: separate, float64, no shortcuts."""

import torch

from spa_ray.objectives.logprobs import sequence_logprobs
from spa_ray.training.preference_step import concat_preference_batch


@torch.no_grad()
def policy_reference_logps(policy, reference, batch):
    """Sequence log-probs of chosen-then-rejected rows under policy and reference, float64,
    each from its own forward (what the step under test computes in one)."""
    cat = concat_preference_batch(batch)

    def logps(model):
        logits = model(input_ids=cat["input_ids"], attention_mask=cat["attention_mask"]).logits
        return sequence_logprobs(logits, cat["input_ids"], cat["response_mask"]).double()

    return logps(policy), logps(reference)
