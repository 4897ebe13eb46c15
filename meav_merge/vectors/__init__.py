"""Alignment vectors: AV = θ_aligned − θ_unaligned, their algebra, extraction and application.

``AlignmentVector`` is the whole idea in one class with plain operators; ``extract_vector``
makes one from two checkpoints; ``apply_vectors`` adds Σ λ·AV to a loaded model in place.
"""

from meav_merge.vectors.alignment_vector import (  # noqa: F401
    META_NAME,
    AlignmentVector,
    VectorError,
    apply_vectors,
    check_vector_against,
    extract_vector,
    is_vector_dir,
    model_tensors,
)
from meav_merge.io.checkpoint import fingerprint  # noqa: F401
