"""Every README example is executed by the test suite, on tiny models (issue 19).

README.md is parsed fresh: a README that drifts from the code fails here.

- ```python blocks run exactly as written, in a folder laid out like the repository
  (models/smollm2-135m-instruct, runs/<domain>/{aligned,vector}) holding tiny random models.
- ```bash blocks: every `meav`, `lm_eval` and `accelerate launch -m meav_merge.cli` command,
  continuation lines joined. A `...` stands for the arguments of the block's first command of
  the same program (what the README means by it). Each is checked at one of three depths:
  * run for real, paths resolved in the tiny folder: `meav data split/validate` (on a tiny
    JSONL at the README's path) and the first `lm_eval` line (with `--limit 1` appended,
    the one change made to it, so it scores one query per domain);
  * argument parsing by the real parser (meav's own, and lm-eval's `HarnessCLI`): every
    other command, since they need the embedded model, a server or long training: `meav
    train/judge/eval/search/awot/serve/data synthesize`, the other `lm_eval` lines;
  * and, for every command: each repository file it names (`yaml_recipes/...`,
    `accelerate/...`, `data/...`) exists, and each lm-eval task it names is registered.
- `make`, `pip`, `export` and `curl` lines are not ours to check and are skipped.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SKIPPED = ("make", "pip", "export", "curl")
# commands run for real on the tiny folder; everything else is checked by argument parsing
RUN = (("meav", "data", "split"), ("meav", "data", "validate"))
REPO_PATH = re.compile(r"^(yaml_recipes|accelerate|data|eval_tasks)/")


def blocks(lang: str):
    text = (ROOT / "README.md").read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(rf"```{lang}\n(.*?)```", text, re.S)]


def commands():
    """(README line, argv) of every command in the ```bash blocks, `...` expanded."""
    out = []
    for start, body in blocks("bash"):
        joined = re.sub(r"\\\n\s*", " ", body)
        first = {}
        for offset, line in enumerate(joined.splitlines()):
            argv = shlex.split(line, comments=True)
            if not argv or argv[0] in SKIPPED:
                continue
            if argv[:2] == ["accelerate", "launch"]:
                argv = ["meav", *argv[argv.index("meav_merge.cli") + 1:]]
            if "..." in argv:
                argv = _expand(argv, first[argv[0]])
            first.setdefault(argv[0], argv)
            out.append((start + offset + 1, argv))
    return out


def _expand(argv, model):
    """`prog sub ... --x 1`: the model command's options that this line does not set, then this line's."""
    i = argv.index("...")
    given = {a for a in argv if a.startswith("--")}
    groups = []
    for a in model[1:]:
        if a.startswith("--"):
            groups.append([a])
        elif groups:
            groups[-1].append(a)
    return [*argv[:i], *(a for g in groups if g[0] not in given for a in g), *argv[i + 1:]]


def test_the_readme_has_examples_to_check():
    progs = {argv[0] for _, argv in commands()}
    assert {"meav", "lm_eval"} <= progs and len(blocks("python")) >= 2


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_dirs):
    """A folder laid out like the repository after `make demo`, with tiny models."""
    from tiny import CHATML, CORPUS, SPECIALS, build_model, perturbed, save
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from meav_merge.awot.anchors import ANCHOR_SETS
    from meav_merge.vectors.alignment_vector import extract_vector

    root = tmp_path_factory.mktemp("readme")
    # the AWOT example uses the sentiment anchor words: the tiny vocabulary must hold them
    words = [w for side in ANCHOR_SETS["sentiment"] for w in side]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(CORPUS + [" ".join(words)] * 20, trainer=trainers.BpeTrainer(
        vocab_size=512, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    base = build_model(tokenizer, seed=0)
    save(base, tokenizer, root / "models" / "smollm2-135m-instruct")
    for seed, domain in enumerate(("medical", "financial", "legal", "safety"), start=1):
        aligned = save(perturbed(base, seed), tokenizer, root / "runs" / domain / "aligned")
        extract_vector(aligned, root / "models" / "smollm2-135m-instruct", root / "runs" / domain / "vector")
    return root


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_snippet_runs_as_written(project, index, monkeypatch):
    line, code = blocks("python")[index]
    monkeypatch.chdir(project)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
    except Exception as e:  # name the snippet, not this test's frame
        pytest.fail(f"README.md:{line}: the snippet raises {type(e).__name__}: {e}")


def _meav_parser():
    from meav_merge.cli.main import build_parser

    return build_parser()


def _lm_eval_parser():
    from lm_eval._cli import HarnessCLI

    return HarnessCLI()._parser


@pytest.fixture(scope="module")
def registered_tasks():
    from lm_eval.tasks import TaskManager

    return set(TaskManager().all_tasks)


CASES = commands()


@pytest.mark.parametrize("line, argv", CASES, ids=[f"L{line}:{' '.join(a[:3])}" for line, a in CASES])
def test_shell_command_matches_the_code(line, argv, registered_tasks, monkeypatch):
    # the README's model folders are the reader's (runs/..., /models/Mistral-...): the flags are
    # checked here, the folders' existence by tests/test_fail_fast.py
    monkeypatch.setattr("meav_merge.cli.options._local_dir", lambda path: True)
    outputs = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--out"}
    for arg in argv:  # every repository file the example names is shipped
        for token in re.split(r"[=,:]", arg):
            if REPO_PATH.match(token) and token not in outputs and not _written_earlier(token, line):
                assert (ROOT / token).exists(), f"README.md:{line}: {token} does not exist in the repository"
    if argv[0] == "meav":
        try:
            _meav_parser().parse_args(argv[1:])
        except SystemExit as e:
            pytest.fail(f"README.md:{line}: `{shlex.join(argv)}` does not parse (exit {e.code})")
    elif argv[0] == "lm_eval":
        try:
            args = _lm_eval_parser().parse_args(["run", *argv[1:]])
        except SystemExit as e:
            pytest.fail(f"README.md:{line}: `{shlex.join(argv)}` does not parse (exit {e.code})")
        for task in args.tasks if isinstance(args.tasks, list) else str(args.tasks).split(","):
            assert task in registered_tasks, f"README.md:{line}: lm-eval task {task!r} is not registered"
        if args.metadata:
            json.loads(args.metadata if isinstance(args.metadata, str) else json.dumps(args.metadata))
    else:
        pytest.fail(f"README.md:{line}: no check for `{argv[0]}` commands; add one to tests/test_readme.py")


def table_commands():
    """(README line, argv) of the `meav ...` commands quoted in table rows ("The pieces"), the
    ones written out as a reader would type them: with options, and no `[optional]`, `a | b`,
    `a / b` or `...` (`meav judge` alone names a command, it is not an example)."""
    out = []
    for n, line in enumerate((ROOT / "README.md").read_text().splitlines(), 1):
        for cmd in re.findall(r"^\| `(meav [^`]+)`", line):
            if "--" in cmd and not re.search(r"\[|\\\||\.\.\.| / ", cmd):
                out.append((n, shlex.split(cmd)))
    return out


TABLE_CASES = table_commands()


@pytest.mark.parametrize("line, argv", TABLE_CASES, ids=[f"L{line}:{' '.join(a[:3])}" for line, a in TABLE_CASES])
def test_table_command_parses(line, argv, monkeypatch):
    # `--lambdas -2:4:0.5` in this table once failed as written (argparse took the value for a flag)
    monkeypatch.setattr("meav_merge.cli.options._local_dir", lambda path: True)
    try:
        _meav_parser().parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"README.md:{line}: `{shlex.join(argv)}` does not parse (exit {e.code})")


def test_the_readme_tables_quote_commands():
    assert len(TABLE_CASES) >= 3


def _written_earlier(token: str, line: int) -> bool:
    """A path an earlier command of the README writes (`--out data/x.jsonl`)."""
    return any(token in argv[argv.index("--out") + 1:argv.index("--out") + 2]
               for earlier, argv in CASES if earlier < line and "--out" in argv)


def test_data_commands_run_as_written(project):
    """`meav data split FILE --write` and `meav data validate FILE`, on a tiny file at the README's path."""
    ran = [argv for _, argv in CASES if tuple(argv[:3]) in RUN]
    assert len(ran) == 2
    src = [json.loads(line) for line in (ROOT / "data" / "medical.jsonl").read_text().splitlines()[:12]]
    for argv in ran:
        target = project / argv[3]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "split"}) + "\n" for r in src))
        proc = subprocess.run([str(BIN / "meav"), *argv[1:]], cwd=project, capture_output=True, text=True, env=ENV)
        assert proc.returncode == 0, f"{shlex.join(argv)}: {proc.stderr[-2000:]}"
    assert all("split" in json.loads(r) for r in (project / ran[0][3]).read_text().splitlines())


def test_first_lm_eval_command_runs_on_a_tiny_merge(project):
    """The Evaluation section's first command, with `--limit 1` appended and out/insurance a tiny merge."""
    import yaml

    from meav_merge.merge.recipe import merge_recipe

    line, argv = next((line, a) for line, a in CASES if a[0] == "lm_eval" and "..." not in a and "hf" in a)
    model = next(a.split("=", 1)[1] for a in argv if a.startswith("pretrained="))
    recipe = project / "tiny_recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "meav", "base_model": "models/smollm2-135m-instruct",
                                      "models": [{"model": "runs/medical/vector", "parameters": {"lambda": 0.5}}]}))
    cwd = os.getcwd()
    os.chdir(project)
    try:
        if not (project / model).exists():
            merge_recipe(recipe, model, quiet=True)
    finally:
        os.chdir(cwd)
    proc = subprocess.run([str(BIN / "lm_eval"), *argv[1:], "--limit", "1"], cwd=project, capture_output=True,
                          text=True, env=ENV, timeout=900)
    assert proc.returncode == 0, f"README.md:{line}: {proc.stderr[-2000:]}"
    assert "pref_acc_target" in proc.stdout
