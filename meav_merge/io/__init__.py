"""Checkpoints on disk: safetensors-only reading, atomic writing, fingerprints, and the embedded base model."""
