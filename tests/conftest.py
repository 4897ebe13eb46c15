import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory, tiny_tokenizer):
    """base, aligned_a, aligned_b (perturbations of base) and other (a different random model)."""
    from tiny import build_model, perturbed, save

    root = tmp_path_factory.mktemp("tiny")
    base = build_model(tiny_tokenizer, seed=0)
    dirs = {
        "base": save(base, tiny_tokenizer, root / "base"),
        "aligned_a": save(perturbed(base, 1), tiny_tokenizer, root / "aligned_a"),
        "aligned_b": save(perturbed(base, 2), tiny_tokenizer, root / "aligned_b"),
        "other": save(build_model(tiny_tokenizer, seed=7), tiny_tokenizer, root / "other"),
    }
    return dirs


@pytest.fixture(scope="session")
def embedded_model():
    """The embedded SmolLM2-135M-Instruct, materialized once into models/ (about 25 s)."""
    from meav_merge.io.base_model import materialize_base

    return materialize_base(ROOT / "models" / "smollm2-135m-instruct")
