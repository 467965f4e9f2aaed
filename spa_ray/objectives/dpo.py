"""DPO margin and loss (SPA Eq. 5-6).

m = beta * ((log pi_theta(y_w) - log pi_ref(y_w)) - (log pi_theta(y_l) - log pi_ref(y_l)))
L_DPO = -log sigma(m)

The reference log-probs are detached here, by design: the reference is a fixed target,
so even a caller that forgets `no_grad` around the reference forward can never push
gradients (or keep a graph alive) through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_1d, check_floating, check_positive, check_same_shape


def dpo_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair implicit-reward margin m [B]; differentiable w.r.t. the policy inputs only."""
    beta = check_positive("beta", beta)
    check_same_shape(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    check_1d("policy_chosen", policy_chosen)
    check_floating(
        policy_chosen=policy_chosen, policy_rejected=policy_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected
    )
    ref_logratio = ref_chosen.detach() - ref_rejected.detach()
    return beta * ((policy_chosen - policy_rejected) - ref_logratio)


def dpo_loss(margin: torch.Tensor) -> torch.Tensor:
    """-log sigma(m) per pair [B], not reduced (logsigmoid is stable for large |m|)."""
    check_1d("margin", margin)
    check_floating(margin=margin)
    return -F.logsigmoid(margin)
