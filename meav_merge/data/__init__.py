"""Preference data: the JSONL schema, validation, deterministic splits, and ``synth/`` (growing data with an LLM).

The schema's API is re-exported here: ``from meav_merge.data import load_records``.
"""

from meav_merge.data.schema import *  # noqa: F401,F403
from meav_merge.data.schema import DataError, Record, load_records, read_jsonl, validate_file  # noqa: F401
