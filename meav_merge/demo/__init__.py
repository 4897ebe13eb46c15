"""``meav demo``: the main job end to end (base → vectors → merge → lm-eval → sweeps → report), resumable."""
