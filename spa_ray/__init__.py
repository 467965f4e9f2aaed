"""spa-ray: SPA preference alignment as a Ray actor system."""
__version__ = "0.1.0"
