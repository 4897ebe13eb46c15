"""meav_merge: inference-time preference alignment as model editing.

θ = θ_target + Σ_d λ_d · AV_d, where AV_d = θ_aligned(d) − θ_unaligned.

Importing the package is cheap; the API below loads torch on first use.
"""

__version__ = "0.1.0"

_API = {
    "AlignmentVector": "meav_merge.vectors",
    "extract_vector": "meav_merge.vectors",
    "apply_vectors": "meav_merge.vectors",
    "fingerprint": "meav_merge.vectors",
    "materialize_base": "meav_merge.io.base_model",
    "load_records": "meav_merge.data.schema",
    "preference_accuracy": "meav_merge.evaluation.scoring",
}

__all__ = sorted(_API)


def __getattr__(name):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'meav_merge' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
