"""Shared machinery of the SAE workbench: config, LM loading, text, activations, the SAE, training."""
