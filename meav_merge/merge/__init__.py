"""The ``meav`` mergekit method (θ = θ_target + Σ λ·AV), recipe validation, atomic merges and model cards."""
