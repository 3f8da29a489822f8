"""YAML presets of the training script, installed as package data (``sea_jax.configs``)."""
