"""AWOT: steering generation through the LM head's input with anchor words, without touching weights.

``steering`` holds the hook (iterative and closed form), ``anchors`` the word sets, ``evaluate`` the paper's evaluations.
"""

from meav_merge.awot.anchors import (  # noqa: F401
    ANCHOR_SETS,
    SENTIMENT_NEGATIVE,
    SENTIMENT_POSITIVE,
    AnchorError,
    Anchors,
    anchors_from_words,
    automatic_anchors,
    load_causal_lm,
    manual_anchors,
    resolve_anchors,
)
from meav_merge.awot.steering import (  # noqa: F401
    AWOTConfig,
    AWOTConfigError,
    AWOTLogitsProcessor,
    AWOTSteering,
    anchor_direction,
    anchor_logit_gap,
    final_norm,
    output_head,
    awot_steering,
    step_coefficient,
)
