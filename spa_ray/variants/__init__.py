"""Seed methods beside SPA as plug-ins at one point of the loop each (README "Variants").

- ``sspo``: unpaired responses pseudo-labelled against a Bayes-risk threshold (loss form + extra rows);
- ``sp2dpo``: a per-pair beta_i column from an annotator (per-pair beta);
- ``s_sppo``: SPPO's squared loss with semantically gated targets and latent repulsion (loss form);
- ``wdro_dpo``: Wasserstein worst-case pair weights (per-pair weight).

Selected by ``variant.name`` in the run config (``variant.config.VariantConfig``). The math
is in ``spa_ray/objectives/{sspo,sp2dpo,sppo,wdro}.py``; this package holds the plug-ins
that need models or data (annotators, the embedder, the unpaired pool), the per-step
objectives (``objective.py``), the trainer-side extras (``training.py``) and the driver-side
stage preparation (``stage.py``). Importing it loads nothing heavy.
"""

from spa_ray.variants.config import VARIANT_NAMES, VariantConfig

__all__ = ["VARIANT_NAMES", "VariantConfig"]
