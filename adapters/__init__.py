"""Adapters: thin glue between the core model and kornia / hloc."""
