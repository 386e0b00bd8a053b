"""Thin adapters from the models to other frameworks. Nothing here is imported by ``import metazoo``."""
