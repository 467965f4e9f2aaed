"""Self-refined DPO loss (SPA Eq. 9-10).

L_rf = -((1 - alpha*z) log sigma(m) + alpha*z log sigma(-m))

z = 1 marks a pair whose label is suspected noisy; for it the target is smoothed from
1 to 1 - alpha (label smoothing). With z = 1 everywhere this is exactly conservative DPO
(TRL's `label_smoothing=alpha`); with z = 0 it is plain DPO. z is a label, not a path
for gradients, so it is detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import as_bool_mask, check_1d, check_floating, check_same_shape, check_unit_interval


def refined_dpo_loss(margin: torch.Tensor, z: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-pair refined loss [B]; `z` bool or 0/1 [B], `alpha` in [0, 1]."""
    alpha = check_unit_interval("alpha", alpha)
    check_1d("margin", margin)
    check_floating(margin=margin)
    check_same_shape(margin=margin, z=z)
    w = as_bool_mask("z", z.detach()).to(margin.dtype) * alpha
    return -((1.0 - w) * F.logsigmoid(margin) + w * F.logsigmoid(-margin))
