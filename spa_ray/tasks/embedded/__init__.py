"""The bundled embedded world and its tiny model (see docs/world.md)."""

from .task import EmbeddedTask
from .world import DemoQuality, KnowledgeBase, PromptSpec, World

__all__ = ["EmbeddedTask", "World", "KnowledgeBase", "PromptSpec", "DemoQuality", "build_embedded_model"]


def build_embedded_model(*args, **kwargs):
    """Lazy alias of :func:`spa_ray.tasks.embedded.build.build_embedded_model` (imports torch)."""
    from .build import build_embedded_model as _build

    return _build(*args, **kwargs)
