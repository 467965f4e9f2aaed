"""Configuration types that live below the layers that use them.

``tree``: loading a tree of documented dataclasses from YAML plus ``key.sub=value``
overrides (generic, no SPA names); ``placement``: actor groups, placement and the weight
transport. The run's whole config (``SPAConfig``) is composed in ``pipeline.config``.
"""
