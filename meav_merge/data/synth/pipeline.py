"""``meav data synthesize``: grow a preference dataset with an LLM, the way the MEAV paper did.

Personas (a PersonaHub-style file and/or CreatePersona: root persona–topic pairs, then
related personas of each, for several seeds) → one first-person domain query per
persona → three replies per query (expert / generic / avoidance), each with its own
random target length. Outputs that are empty, truncated, not English (``synthesis_filters``),
or repeat an earlier query are dropped; a triple with any dropped reply is dropped
whole. The prompts are in ``synthesis_prompts``.

The output is an append-only JSONL file of records in the project schema (without
``split``: ``meav data split`` assigns it). Each line is written whole and fsync'ed;
ids are a hash of domain + persona + seed, so re-running the same command skips what
is already there, and a line cut off by a kill is removed on the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from tqdm.auto import tqdm

from meav_merge.coefficients import number_arg
from meav_merge.data.synth import prompts
from meav_merge.data.appendlog import AppendOnlyJsonl
from meav_merge.data.schema import PROFICIENCY_LEVELS, DataError, iter_jsonl, levels_for, parse_record, words
from meav_merge.data.synth.llm_client import ChatResult, LLMError
from meav_merge.data.synth.filters import clean_reply, drop_reason


class SynthesisError(ValueError):
    """Bad synthesis settings or inputs; the message names the file or setting."""


def _opt(default, help: str, **meta):
    """A config field with its command-line help (``meav data synthesize`` flags come from these)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class SynthesisConfig:
    domain: str = _opt("medical", "proficiency domain")
    # one record per persona, so personas beyond the drops are used
    n_personas: int = _opt(100, "records wanted", flags=("--n", "--n-personas"))
    personas_file: Optional[str] = _opt(None, 'PersonaHub-style JSONL, {"persona": ...} per line',
                                        flags=("--personas", "--personas-file"))
    create_persona: bool = _opt(False, "let the LLM create personas (CreatePersona; after the file's, if both)")
    persona_roots: int = _opt(5, "CreatePersona: root persona-topic pairs per round (paper: 5)")
    persona_rounds: int = _opt(3, "CreatePersona: rounds with different seeds (paper: 3)")
    persona_related: int = _opt(3, "CreatePersona: related personas asked for per persona")
    persona_depth: int = _opt(2, "CreatePersona: levels of related personas below the roots")
    min_words: int = _opt(25, "shortest target reply length, drawn uniformly per reply")
    max_words: int = _opt(200, "longest target reply length")
    temperature: float = _opt(0.7, "sampling temperature of every LLM call")
    max_tokens: int = _opt(512, "per LLM call; an answer that hits it is dropped as truncated")
    concurrency: int = _opt(4, "LLM calls in flight at once")
    seed: int = _opt(0, "part of every record id and LLM seed")

    def __post_init__(self):
        if levels_for(self.domain) != PROFICIENCY_LEVELS or not self.domain.replace("_", "").isalnum():
            raise SynthesisError(f"domain '{self.domain}': synthesis makes expert/generic/avoidance triples; "
                                 f"'{self.domain}' has levels {'/'.join(levels_for(self.domain))}")
        if not self.personas_file and not self.create_persona:
            raise SynthesisError("no personas: give a personas file (--personas) and/or --create-persona")
        for name in ("n_personas", "persona_roots", "persona_rounds", "persona_related", "min_words",
                     "max_tokens", "concurrency"):
            if getattr(self, name) < 1:
                raise SynthesisError(f"{name} must be at least 1, not {getattr(self, name)}")
        if self.persona_depth < 0:
            raise SynthesisError(f"persona_depth must be 0 or more, not {self.persona_depth}")
        if self.max_words < self.min_words:
            raise SynthesisError(f"max_words ({self.max_words}) is below min_words ({self.min_words})")
        if self.temperature < 0:
            raise SynthesisError(f"temperature must be 0 or more, not {self.temperature}")


@dataclass
class SynthesisSummary:
    out: Path
    target: int
    personas: int = 0  # personas available for this run
    written: int = 0  # new records this run
    skipped_done: int = 0  # this run's records already in the output
    dropped: Counter = field(default_factory=Counter)  # reason -> records
    repaired_tail: bool = False  # a partial last line (killed run) was removed
    persona_answers_unusable: int = 0  # CreatePersona answers without a JSON list of personas

    @property
    def done(self) -> int:
        return self.written + self.skipped_done

    def __str__(self) -> str:
        text = f"wrote {self.written} records to {self.out} ({self.skipped_done} already there)"
        if self.dropped:
            text += f"; dropped {sum(self.dropped.values())}: " + ", ".join(
                f"{reason.replace('_', ' ')} {n}" for reason, n in self.dropped.most_common())
        if self.persona_answers_unusable:
            text += f"; {self.persona_answers_unusable} CreatePersona answers held no usable JSON list"
        if self.repaired_tail:
            text += "; removed a partial last line left by an interrupted run"
        if self.done < self.target:
            text += (f"; only {self.done} of {self.target} records: the {self.personas} personas ran out "
                     "(add personas, or raise the CreatePersona rounds/depth)")
        return text


def _digest(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _derived_seed(*parts) -> int:
    """A per-call seed (fits every server's int) so reruns ask the same questions."""
    return int(_digest(*parts)[:7], 16)


def _norm(text: str) -> str:
    return " ".join(words(text))


def record_id(domain: str, persona: str, seed: int) -> str:
    return f"{domain}-syn-{_digest(domain, _norm(persona), seed)[:12]}"


# --- personas --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Persona:
    text: str
    topic: str = ""  # what CreatePersona said they ask about; empty for file personas


def read_personas(path: str | os.PathLike) -> List[Persona]:
    """PersonaHub-style JSONL: {"persona": ...} (or {"input persona": ...}) per line."""
    path = Path(path)
    out = []
    for ln, obj, _ in iter_jsonl(path, SynthesisError):
        text = obj.get("persona", obj.get("input persona")) if isinstance(obj, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise SynthesisError(f"{path}:{ln}: needs a non-empty string field 'persona' (or 'input persona')")
        out.append(Persona(" ".join(text.split())))
    if not out:
        raise SynthesisError(f"{path}: no personas")
    return out


def _persona_cache(out: Path, cfg: SynthesisConfig) -> Path:
    # Created personas are kept beside the output, so a rerun resumes on the same ones
    # (an LLM asked again would invent others, and with them other record ids). Hidden
    # and not .jsonl, so a data directory scan never mistakes it for records.
    key = _digest(cfg.domain, cfg.seed, cfg.persona_roots, cfg.persona_rounds, cfg.persona_related,
                  cfg.persona_depth)[:10]
    return out.with_name(f".{out.name}.personas-{key}.json")


def create_personas(backend, cfg: SynthesisConfig, pool: ThreadPoolExecutor,
                    progress: bool = True) -> Tuple[List[Persona], int]:
    """CreatePersona: rounds × (roots, then `depth` levels of related personas), in a fixed order.

    Returns the personas and the number of answers that held no usable JSON list.
    """
    def ask(messages, *seed_parts) -> List[Persona]:
        result = backend.complete(messages, max_tokens=max(cfg.max_tokens, 1024), temperature=cfg.temperature,
                                  seed=_derived_seed(cfg.seed, *seed_parts))
        return [Persona(p, t) for p, t in prompts.parse_persona_list(result.text)]

    n_calls = cfg.persona_rounds * sum(cfg.persona_roots * cfg.persona_related**d for d in range(cfg.persona_depth)) \
        + cfg.persona_rounds
    bar = tqdm(total=n_calls, desc="CreatePersona calls", unit="call", disable=not progress)
    found: List[Persona] = []
    unusable = 0
    try:
        for rnd in range(cfg.persona_rounds):
            level = ask(prompts.root_personas_messages(cfg.domain, cfg.persona_roots), "roots", rnd)
            level = level[:cfg.persona_roots]
            unusable += not level
            bar.update(1)
            found += level
            for depth in range(1, cfg.persona_depth + 1):
                futures = [pool.submit(ask, prompts.related_personas_messages(cfg.domain, p.text, p.topic,
                                                                              cfg.persona_related),
                                       "related", rnd, depth, p.text) for p in level]
                level = []
                for fut in futures:  # submission order, so the list does not depend on timing
                    related = fut.result()[:cfg.persona_related]
                    unusable += not related
                    level += related
                    bar.update(1)
                found += level
    finally:
        bar.close()
    return found, unusable


def gather_personas(backend, cfg: SynthesisConfig, out: Path, pool: ThreadPoolExecutor,
                    progress: bool = True) -> Tuple[List[Persona], int]:
    """The file's personas, then the created ones (from the cache when there is one), deduplicated."""
    personas = read_personas(cfg.personas_file) if cfg.personas_file else []
    unusable = 0
    if cfg.create_persona:
        cache = _persona_cache(out, cfg)
        if cache.is_file():
            try:
                created = [Persona(**p) for p in json.loads(cache.read_text(encoding="utf-8"))["personas"]]
            except (ValueError, KeyError, TypeError) as e:
                raise SynthesisError(f"{cache}: unreadable persona cache ({e}); delete it to create "
                                     "personas again") from None
        else:
            created, unusable = create_personas(backend, cfg, pool, progress)
            if created:  # nothing to resume on otherwise: let a rerun ask again
                tmp = cache.with_name(cache.name + ".tmp")
                tmp.write_text(json.dumps({"config": asdict(cfg), "personas": [asdict(p) for p in created]},
                                          ensure_ascii=False, indent=1), encoding="utf-8")
                os.replace(tmp, cache)
        personas += created
    unique: Dict[str, Persona] = {}
    for p in personas:  # the same persona twice would be the same record id
        unique.setdefault(_norm(p.text), p)
    return list(unique.values()), unusable


# --- the pipeline ----------------------------------------------------------------------------
@dataclass
class _Outcome:
    record: Optional[dict] = None
    reason: Optional[str] = None


class _Synthesizer:
    def __init__(self, backend, cfg: SynthesisConfig, taken_queries: Set[str]):
        self.backend, self.cfg = backend, cfg
        self._queries = taken_queries
        self._queries_lock = threading.Lock()

    def _ask(self, messages, *seed_parts) -> ChatResult:
        return self.backend.complete(messages, max_tokens=self.cfg.max_tokens, temperature=self.cfg.temperature,
                                     seed=_derived_seed(*seed_parts))

    def _claim_query(self, query: str) -> bool:
        with self._queries_lock:
            if _norm(query) in self._queries:
                return False
            self._queries.add(_norm(query))
            return True

    def _release_query(self, query: str) -> None:
        with self._queries_lock:
            self._queries.discard(_norm(query))

    def make_record(self, rid: str, persona: Persona) -> _Outcome:
        cfg = self.cfg
        result = self._ask(prompts.query_messages(cfg.domain, persona.text, persona.topic), rid, "query")
        if reason := drop_reason(result):
            return _Outcome(reason=reason)
        query = clean_reply(result.text)
        if not self._claim_query(query):
            return _Outcome(reason="duplicate_query")
        lengths = random.Random(_derived_seed(rid, "lengths"))  # independent per reply: length hides the level
        record = {"id": rid, "domain": cfg.domain, "persona": persona.text, "query": query}
        for level in PROFICIENCY_LEVELS:
            target = lengths.randint(cfg.min_words, cfg.max_words)
            result = self._ask(prompts.response_messages(cfg.domain, level, query, target), rid, level)
            if reason := drop_reason(result):  # an incomplete triple is useless: stop asking
                self._release_query(query)
                return _Outcome(reason=reason)
            record[level] = clean_reply(result.text)
        try:
            parse_record(record, rid, known_domains={cfg.domain: PROFICIENCY_LEVELS})
        except DataError as e:
            self._release_query(query)
            return _Outcome(reason="identical_levels" if "identical" in str(e) else "invalid")
        return _Outcome(record=record)


def _resumable(obj: dict, where: str) -> None:
    if "split" in obj:  # appending split-less records would make the file unloadable
        raise DataError(f"{where}: has a 'split' field, so this is a finished dataset, not a synthesis "
                        "output; write to another --out (or pass --force to replace it)")


def synthesize(backend, cfg: SynthesisConfig, out: str | os.PathLike, force: bool = False,
               progress: bool = True) -> SynthesisSummary:
    """Write up to ``cfg.n_personas`` records to ``out`` (appending; resumes a previous run)."""
    out = Path(out)
    if force:
        for cache in out.parent.glob(f".{out.name}.personas-*.json"):
            cache.unlink()
    store = AppendOnlyJsonl(out, force=force, check=_resumable)
    summary = SynthesisSummary(out=out, target=cfg.n_personas, repaired_tail=store.repaired_tail)
    done_ids = {obj["id"] for obj in store.existing}
    taken = {_norm(o["query"]) for o in store.existing if isinstance(o.get("query"), str)}
    worker = _Synthesizer(backend, cfg, taken)
    pool = ThreadPoolExecutor(max_workers=cfg.concurrency, thread_name_prefix="meav-synth")
    pending: Dict[Future, str] = {}
    try:
        personas, summary.persona_answers_unusable = gather_personas(backend, cfg, out, pool, progress)
        candidates = [(record_id(cfg.domain, p.text, cfg.seed), p) for p in personas]
        summary.personas = len(candidates)
        summary.skipped_done = min(cfg.n_personas, sum(rid in done_ids for rid, _ in candidates))
        todo = iter([(rid, p) for rid, p in candidates if rid not in done_ids])
        bar = tqdm(total=cfg.n_personas, initial=summary.skipped_done, desc=f"synthesize {cfg.domain}",
                   unit="record", disable=not progress)
        with bar:
            while True:
                # Submit lazily: only as many as could still be needed, `concurrency` at a time.
                while len(pending) < cfg.concurrency and summary.done + len(pending) < cfg.n_personas:
                    nxt = next(todo, None)
                    if nxt is None:
                        break
                    pending[pool.submit(worker.make_record, *nxt)] = nxt[0]
                if not pending:
                    break
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                # Keep every record that finished alongside a failure; then the failure stops the run.
                failed = next((f for f in finished if f.exception() is not None), None)
                for fut in finished:
                    del pending[fut]
                    if fut is failed or fut.exception() is not None:
                        continue
                    outcome = fut.result()
                    if outcome.record is not None:
                        store.append(outcome.record)
                        summary.written += 1
                        bar.update(1)
                    else:
                        summary.dropped[outcome.reason] += 1
                        bar.set_postfix(dropped=sum(summary.dropped.values()))
                if failed is not None:
                    failed.result()  # raises it
    except LLMError as e:
        e.args = (f"{e} (stopped after writing {summary.written} records to {out}; "
                  "rerun the same command to resume)",)
        raise
    finally:
        # After an error, do not wait for the calls still in flight (they may be retrying).
        pool.shutdown(wait=not pending, cancel_futures=True)
        store.close()
    return summary


# --- command line ----------------------------------------------------------------------------
def _make_backend(args):
    from meav_merge.data.synth.llm_client import OpenAICompatibleBackend, TransformersBackend

    if args.backend == "local":
        return TransformersBackend(args.model_dir)
    if not args.base_url or not args.model:
        raise SynthesisError("--backend openai needs --base-url and --model")
    return OpenAICompatibleBackend(args.base_url, args.model, api_key_env=args.api_key_env, timeout=args.timeout,
                                   max_retries=args.max_retries)


def _cmd_synthesize(args) -> None:
    from meav_merge.cli.options import config_from_args

    print(synthesize(_make_backend(args), config_from_args(SynthesisConfig, args), args.out, force=args.force))


def add_cli(data_subparsers) -> None:
    """Register ``synthesize`` under the ``meav data`` subcommand group."""
    from meav_merge.cli.options import add_config_args
    from meav_merge.resources import DEFAULT_MODEL_DIR

    p = data_subparsers.add_parser(
        "synthesize", help="generate expert/generic/avoidance records with an LLM (resumable)",
        description="Personas -> one query each -> three replies (expert, generic, avoidance), as in the MEAV "
                    "paper. Appends to --out; rerunning the same command resumes.")
    p.add_argument("--out", required=True, metavar="FILE", help="output JSONL (appended to; rerun to resume)")
    p.add_argument("--backend", choices=["openai", "local"], default="openai",
                   help="openai: any OpenAI-compatible endpoint; local: a Hugging Face model on CPU")
    p.add_argument("--base-url", metavar="URL", help="endpoint base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--model", metavar="NAME", help="model name at the endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the API key, if any (default: %(default)s)")
    p.add_argument("--timeout", type=number_arg("--timeout", positive=True), default=60.0,
                   help="seconds per request (default: %(default)s)")
    p.add_argument("--max-retries", type=number_arg("--max-retries", integer=True, minimum=0), default=5,
                   help="retries on 429/5xx/timeouts (default: %(default)s)")
    p.add_argument("--model-dir", metavar="DIR", default=str(DEFAULT_MODEL_DIR),
                   help="--backend local: Hugging Face model directory (default: %(default)s)")
    add_config_args(p, SynthesisConfig)
    p.add_argument("--force", action="store_true", help="start over: delete the existing output first")
    p.set_defaults(func=_cmd_synthesize)
