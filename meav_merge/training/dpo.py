"""Train alignment vectors with trl's DPOTrainer (IPO loss, β = 0.1), then extract them.

``MeavTrainConfig`` sits beside the trainer the way trl's ``*Config`` classes do.
Two presets:

- ``cpu`` (default): float32, only the top transformer layers and the final norm
  train, reference log-probs are computed once (and cached with the dataset, so a
  resumed run does not redo them), sequences are cut to ``max_length`` tokens. This
  is what makes one domain of SmolLM2-135M fit in minutes on two CPU cores.
- ``paper``: the MEAV paper's full-model setting (all parameters, one epoch, batch
  size 4, bf16 when a GPU supports it) for GPU users, e.g. under ``accelerate launch``.

Pairs come from adjacent levels (expert ≻ generic, generic ≻ avoidance; safe ≻
unsafe; helpful ≻ unhelpful). ``preference_vector=True`` also trains on the swapped
pairs and writes φ = θ+ − θ− (Preference Vectors). ``joint`` trains one model on
several domains at once with a target level per domain (the paper's baseline).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from meav_merge.io.checkpoint import atomic_output_dir, copy_model_files
from meav_merge.data.schema import DataError, Record, file_sha256, levels_for, load_records, resolve_data_files

logger = logging.getLogger(__name__)

PRESETS = {
    # cpu: lr 2e-4 because at 1e-4 the medical vector saturated at 69% avoidance (need 70%);
    # at 2e-4 medical reaches expert 1.00 (λ=+2) and avoidance 0.72 (λ=-4) on its test split.
    "cpu": dict(trainable_layers=4, learning_rate=2e-4, per_device_train_batch_size=4, max_length=256,
                lr_scheduler_type="cosine", warmup_ratio=0.03, precision="fp32"),
    "paper": dict(trainable_layers=None, learning_rate=5e-7, per_device_train_batch_size=4, max_length=1024,
                  lr_scheduler_type="cosine", warmup_ratio=0.03, precision="auto"),
}


def _layers_arg(text: str) -> Optional[int]:
    """``--trainable-layers``: a positive count of top layers, or ``all`` (every parameter)."""
    from meav_merge.coefficients import parse_number

    return None if text.strip() == "all" else parse_number(text, "--trainable-layers", integer=True, positive=True)


def _help(text: str, **meta) -> dict:
    return {"help": text, **meta}


@dataclass
class MeavTrainConfig:
    """What ``meav train`` needs beyond the data: trl's DPO settings plus which weights train.

    Every field is a ``meav train`` flag (``cli.options.add_config_args``), its help text
    from the field's metadata, as trl's ``TrlParser`` does for ``DPOConfig``. A field left at
    ``None`` takes the preset's value.
    """

    preset: str = field(default="cpu", metadata=_help(
        "cpu: fast float32 top-layer training; paper: full model, as in the MEAV paper", choices=list(PRESETS)))
    loss_type: str = field(default="ipo", metadata=_help("trl DPO loss (the MEAV paper uses IPO)"))
    beta: float = field(default=0.1, metadata=_help("DPO/IPO β (IPO's target margin is 1/(2β))", positive=True))
    num_train_epochs: float = field(default=1.0, metadata=_help(
        "passes over the train pairs", flags=("--epochs", "--num-train-epochs"), positive=True))
    learning_rate: Optional[float] = field(default=None, metadata=_help(
        "learning rate (default: from the preset)", flags=("--lr", "--learning-rate"), positive=True))
    per_device_train_batch_size: Optional[int] = field(default=None, metadata=_help(
        "pairs per device and step (default: from the preset)", flags=("--batch-size",), positive=True))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("steps per optimizer update", positive=True))
    max_length: Optional[int] = field(default=None, metadata=_help(
        "longest prompt + response in tokens (default: from the preset)", positive=True))
    # -1: the preset's value; None: every parameter
    trainable_layers: Optional[int] = field(default=-1, metadata=_help(
        "top layers to train, or 'all' (default: from the preset)", type=_layers_arg, metavar="N|all"))
    lr_scheduler_type: Optional[str] = field(default=None, metadata=_help(
        "transformers scheduler name (default: from the preset)"))
    warmup_ratio: Optional[float] = field(default=None, metadata=_help(
        "share of steps spent warming up (default: from the preset)", minimum=0))
    precision: Optional[str] = field(default=None, metadata=_help(
        "fp32, bf16, or auto (bf16 only on a GPU that supports it; default: from the preset)",
        choices=["fp32", "bf16", "auto"]))
    frozen_trunk: bool = field(default=True, metadata=_help(
        "compute the frozen lower layers once per sequence instead of every step (see trunk.py)"))
    # Domain-specific vectors: IPO's squared loss (Δ − 1/2β)² on a pair given in both orders
    # sums to 2Δ² + const, i.e. IPO with target margin 0. Such "retain" pairs from the other
    # proficiency domains hold their level margins where the base model has them, so the
    # vector learns this domain's preference without spilling onto the others.
    retain_records: int = field(default=0, metadata=_help(
        "train records per other proficiency domain added as zero-margin IPO pairs, so the vector holds "
        "those domains where the base model has them", minimum=0))
    # An NLL term on the chosen responses (RPO; trl's loss_type "sft"): anchors their
    # likelihood, so the vector does not move probability mass onto text in neither response.
    sft_weight: float = field(default=0.0, metadata=_help(
        "weight of an NLL term on chosen responses (RPO anchor)", minimum=0))
    # The first by id hash, so a subset is the same on every machine; for time-bounded runs
    # such as `meav demo`.
    train_records: Optional[int] = field(default=None, metadata=_help(
        "at most this many train records (the first by id hash; default: all)", positive=True))
    seed: int = field(default=0, metadata=_help("training seed", minimum=0))
    save_steps: int = field(default=20, metadata=_help("checkpoint every N steps (a killed run resumes)",
                                                       positive=True))
    logging_steps: int = field(default=5, metadata=_help("log the loss every N steps", positive=True))
    extra: Dict[str, object] = field(default_factory=dict)  # any other DPOConfig field (Python API only)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset '{self.preset}' (choose {', '.join(PRESETS)})")
        for key, value in PRESETS[self.preset].items():
            if key == "trainable_layers":
                if self.trainable_layers == -1:
                    self.trainable_layers = value
            elif getattr(self, key) is None:
                setattr(self, key, value)
        from meav_merge.coefficients import check_config_fields

        # after the preset fills its fields, so a preset's own values are checked too
        check_config_fields(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def dpo_config(self, output_dir: str, has_eval: bool):
        import torch
        from trl import DPOConfig

        bf16 = self.precision == "bf16" or (self.precision == "auto" and torch.cuda.is_available()
                                             and torch.cuda.is_bf16_supported())
        losses = [self.loss_type] + (["sft"] if self.sft_weight else [])
        return DPOConfig(
            output_dir=output_dir,
            loss_type=losses,
            loss_weights=[1.0, self.sft_weight] if self.sft_weight else None,
            beta=self.beta,
            num_train_epochs=self.num_train_epochs,
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.per_device_train_batch_size,
            per_device_eval_batch_size=self.per_device_train_batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            max_length=self.max_length,
            lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
            # float32 on CPU: bf16 matmuls are ~20x slower than fp32 on these CPUs.
            bf16=bf16,
            fp16=False,
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=8,
            eval_strategy="epoch" if has_eval else "no",
            save_strategy="steps",
            save_steps=self.save_steps,
            save_total_limit=1,
            logging_steps=self.logging_steps,
            report_to=[],
            seed=self.seed,
            data_seed=self.seed,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            # trl's configs default gradient checkpointing to on (~20% slower, saves memory we do not
            # need at this size); transformers 5 names it activation_checkpointing, and the old
            # name raises a FutureWarning
            activation_checkpointing=False,
            disable_tqdm=False,
            **self.extra,
        )


# --- pairs ---------------------------------------------------------------------------------
def preference_pairs(record: Record, target: Optional[str] = None) -> List[Tuple[str, str]]:
    """(chosen, rejected) levels. With a ``target`` level (joint training), levels are
    ranked by their distance from the target and adjacent ranks form pairs."""
    levels = list(record.levels)
    if target is None:
        return record.pairs()
    if target not in levels:
        raise DataError(f"{record.source}: target level '{target}' is not one of {', '.join(levels)}")
    t = levels.index(target)
    ranked = sorted(levels, key=lambda lv: (abs(levels.index(lv) - t), levels.index(lv)))
    pairs = [(target, lv) for lv in ranked[1:] if abs(levels.index(lv) - t) == 1]
    pairs += [(a, b) for a in ranked[1:] for b in ranked[1:] if abs(levels.index(b) - t) == abs(levels.index(a) - t) + 1]
    return pairs


def pair_rows(records: Sequence[Record], swap: bool = False, targets: Optional[Dict[str, str]] = None) -> List[dict]:
    rows = []
    for r in records:
        for chosen, rejected in preference_pairs(r, (targets or {}).get(r.domain)):
            if swap:
                chosen, rejected = rejected, chosen
            rows.append({
                "prompt": [{"role": "user", "content": r.query}],
                "chosen": [{"role": "assistant", "content": r.responses[chosen]}],
                "rejected": [{"role": "assistant", "content": r.responses[rejected]}],
            })
    return rows


def _first(records: List[Record], n: Optional[int]) -> List[Record]:
    from meav_merge.data.schema import _split_key

    return records if n is None else sorted(records, key=lambda r: _split_key(r.id))[:n]


def retain_rows(data: str | os.PathLike, domain: str, n: int) -> List[dict]:
    """Both orders of every adjacent-level pair of ``n`` train records from each other proficiency domain."""
    from meav_merge.data.schema import DOMAIN_LEVELS, PROFICIENCY_LEVELS

    rows = []
    for other, levels in DOMAIN_LEVELS.items():
        if other == domain or levels != PROFICIENCY_LEVELS:
            continue
        try:
            records = load_records(data, other, "train")
        except (DataError, FileNotFoundError):
            continue  # a data folder without this domain: nothing to hold
        picked = _first(records, n)
        rows += pair_rows(picked) + pair_rows(picked, swap=True)
    return rows


# --- training ------------------------------------------------------------------------------
def _freeze(model, trainable_layers: Optional[int]) -> int:
    if trainable_layers is None:
        return sum(p.numel() for p in model.parameters())
    n_layers = model.config.num_hidden_layers
    keep = {f".layers.{i}." for i in range(n_layers - trainable_layers, n_layers)}
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad = any(k in name for k in keep) or name.endswith("model.norm.weight")
        count += p.numel() if p.requires_grad else 0
    return count


def _dataset(rows: List[dict], path: Path):
    """Saved to disk so trl's reference log-prob cache lands beside it and survives a resume."""
    from datasets import Dataset, load_from_disk

    if not (path / "dataset_info.json").is_file():
        Dataset.from_list(rows).save_to_disk(str(path))
    return load_from_disk(str(path))


def _last_checkpoint(output_dir: Path) -> Optional[str]:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def _frozen_trunk_trainer():
    from trl import DPOTrainer

    from meav_merge.training.trunk import use_dense_log_prob_head

    class FrozenTrunkDPOTrainer(DPOTrainer):
        """DPOTrainer on a trunk/head split: the dense LM head replaces trl's tiled one
        before the reference pass (trl patches the model inside __init__)."""

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if not getattr(self.model, "_meav_dense_head", False):
                use_dense_log_prob_head(self.model)
                self.model._meav_dense_head = True
            # Rows exactly as the collator will build them (prompt + completion, cut at max_length).
            limit = self.args.max_length
            groups = {}
            for ex in dataset:
                prompt = tuple(ex["prompt_ids"])
                for key in ("chosen_ids", "rejected_ids"):
                    groups.setdefault(prompt, []).append((list(prompt) + list(ex[key]))[:limit])
            self.model.model.embed_tokens.warm(groups.items())
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return FrozenTrunkDPOTrainer


def run_dpo(base: str | os.PathLike, train_rows: List[dict], eval_rows: List[dict], work: Path,
            config: MeavTrainConfig, out_model: Path, tag: str) -> dict:
    """Train one DPO model into ``out_model`` (resuming from ``work`` if a run was cut off)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    torch.manual_seed(config.seed)
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(base))
    dtype = torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, use_safetensors=True)
    trainable = _freeze(model, config.trainable_layers)
    head = None
    if config.trainable_layers is not None and config.frozen_trunk:
        from meav_merge.training.trunk import split_model

        try:
            _, head = split_model(model, config.trainable_layers)
        except ValueError as e:
            logger.warning("%s; training the full model with frozen lower layers instead", e)
    train_ds = _dataset(train_rows, work / f"{tag}-train")
    eval_ds = _dataset(eval_rows, work / f"{tag}-eval") if eval_rows else None
    args = config.dpo_config(str(work / f"{tag}-trainer"), has_eval=eval_ds is not None)
    if head is not None:
        prompts = {json.dumps(r["prompt"]): r["prompt"] for r in train_rows + eval_rows}
        head.model.embed_tokens.add_prefixes(
            tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
            for p in prompts.values())
    trainer_cls = _frozen_trunk_trainer() if head is not None else DPOTrainer
    init_started = time.time()
    trainer = trainer_cls(model=head if head is not None else model, ref_model=None, args=args,
                          train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok)
    resume = _last_checkpoint(work / f"{tag}-trainer")
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = {"setup_seconds": round(started - init_started, 1),  # tokenizing + reference log-probs
               "train_seconds": round(time.time() - started, 1), "train_steps": trainer.state.global_step,
               "resumed_from": resume,
               "trainable_parameters": trainable, **{k: v for k, v in result.metrics.items()}}
    if eval_ds is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    if head is not None:
        from meav_merge.training.trunk import merge_head

        merge_head(model, trainer.model, config.trainable_layers)
        emb = trainer.model.model.embed_tokens
        metrics["trunk_cache"] = {"sequences": len(emb.cache), "hits": emb.hits, "misses": emb.misses}
        emb.clear()
        for p in model.parameters():
            p.requires_grad = True
        model.save_pretrained(str(out_model), safe_serialization=True)
    else:
        # save_model gathers sharded weights under DeepSpeed ZeRO-3 / FSDP
        trainer.save_model(str(out_model))
    if trainer.accelerator.is_main_process:
        tok.save_pretrained(str(out_model))
        copy_model_files(base, out_model, ["generation_config.json"])
    return metrics


def _training_rows(data, domain: Optional[str], joint: Optional[Dict[str, str]], config: MeavTrainConfig):
    """The data files (each validated, so a bad one stops here naming file:line), the records
    and the DPO rows for train and validation, and how many train rows are retain pairs."""
    from meav_merge.data.schema import read_jsonl

    domains = [domain] if domain else list(joint)
    files = sorted({f for d in domains for f in resolve_data_files(data, d)})
    for f in files:
        read_jsonl(f)
    train = [r for d in domains for r in _first(load_records(data, d, "train"), config.train_records)]
    val = [r for d in domains for r in load_records(data, d, "validation")]
    train_rows, val_rows = pair_rows(train, targets=joint), pair_rows(val, targets=joint)
    n_retain = 0
    if domain and config.retain_records:
        extra = retain_rows(data, domain, config.retain_records)
        n_retain = len(extra)
        train_rows += extra
    return files, train, val, train_rows, val_rows, n_retain


def _provenance(base, domain, joint, config: MeavTrainConfig, files, train, val, train_rows, val_rows,
                n_retain: int) -> dict:
    """What the vector's metadata records about how it was trained."""
    return {
        "domain": domain or "joint",
        "joint_targets": joint,
        "preference": (" > ".join(levels_for(domain)) if domain else
                       ", ".join(f"{d}={t}" for d, t in joint.items())),
        "training": {
            **config.to_dict(),
            "trainer": "trl.DPOTrainer",
            "train_scope": "all" if config.trainable_layers is None else f"top {config.trainable_layers} layers + final norm",
            "data": {"files": [str(f) for f in files], "file_sha256": file_sha256(files),
                     "train_records": len(train), "validation_records": len(val),
                     "train_pairs": len(train_rows) - n_retain, "retain_pairs": n_retain,
                     "validation_pairs": len(val_rows)},
            "base": str(base),
        },
    }


def _claim_partial(work: Path, provenance: dict, preference_vector: bool) -> None:
    """Resume ``work`` only if it was left by a run with the same data and settings.

    trl's checkpoints and the cached reference log-probs there belong to the run that wrote
    them; resuming them under other flags (another loss, learning rate, record count) would
    silently train a mixture of the two runs."""
    stamp = work / "meav_run.json"
    wanted = json.dumps({**provenance, "preference_vector": preference_vector}, sort_keys=True, default=str)
    if stamp.is_file():
        if stamp.read_text() != wanted:
            raise FileExistsError(f"{work}: left by a cut-off run with other data or settings; rerun with "
                                  "its flags to resume it, or remove the folder to start over")
        return
    if work.is_dir() and any(work.iterdir()):
        raise FileExistsError(f"{work}: not a `meav train` work folder (no meav_run.json); remove it to start over")
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(wanted)


def _write_run(out: Path, work: Path, base, provenance: dict, metrics: dict, preference_vector: bool,
               force: bool) -> None:
    """Move the trained model(s) from ``work`` into ``out`` and extract the vector(s), atomically."""
    from meav_merge.vectors.alignment_vector import extract_vector

    with atomic_output_dir(out, force=force) as tmp:
        shutil.move(str(work / "aligned"), str(tmp / "aligned"))
        # the provenance names where the models will live, not the temp folder they are read from
        provenance = {**provenance, "aligned": str(out / "aligned")}
        extract_vector(tmp / "aligned", base, tmp / "vector", meta=provenance)
        if preference_vector:
            shutil.move(str(work / "minus"), str(tmp / "minus"))
            extract_vector(tmp / "aligned", base, tmp / "preference_vector", minus=tmp / "minus",
                           meta={**provenance, "minus": str(out / "minus"),
                                 "preference": provenance["preference"] + " (θ+ − θ−)"})
        (tmp / "train_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)


def train_vector(base: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                 domain: Optional[str] = None, joint: Optional[Dict[str, str]] = None,
                 preference_vector: bool = False, config: Optional[MeavTrainConfig] = None,
                 force: bool = False) -> Path:
    """``meav train``: align, save the aligned model(s) and the vector(s) under ``out``.

    Layout: ``out/aligned`` (θ+), ``out/vector`` (θ+ − θ_base, an alignment vector), and
    with ``preference_vector`` also ``out/minus`` (θ−) and ``out/preference_vector`` (θ+ − θ−).
    Work in progress lives in ``out.partial/`` and is resumed; ``out`` appears only
    when everything is done.
    """
    config = config or MeavTrainConfig()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (pass --force to retrain)")
    if (domain is None) == (joint is None):
        raise ValueError("give exactly one of --domain or --joint")
    files, train, val, train_rows, val_rows, n_retain = _training_rows(data, domain, joint, config)
    provenance = _provenance(base, domain, joint, config, files, train, val, train_rows, val_rows, n_retain)
    work = out.with_name(out.name + ".partial")
    _claim_partial(work, provenance, preference_vector)
    metrics = {"plus": run_dpo(base, train_rows, val_rows, work, config, work / "aligned", "plus")}
    if preference_vector:
        metrics["minus"] = run_dpo(base, pair_rows(train, swap=True, targets=joint),
                                   pair_rows(val, swap=True, targets=joint), work, config, work / "minus", "minus")
    provenance["training"]["metrics"] = metrics
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:  # under `accelerate launch`, rank 0 extracts and writes
        _write_run(out, work, base, provenance, metrics, preference_vector, force)
    state.wait_for_everyone()
    return out
