# The two commands of the README. Each sets up .venv/ first if needed.
.PHONY: demo test setup

setup:
	@bash scripts/setup.sh

# Main job on the embedded SmolLM2-135M-Instruct: base model -> vectors -> merge ->
# lm-eval -> sweeps -> report in out/report/. Re-running resumes.
demo: setup
	HF_HUB_OFFLINE=1 .venv/bin/meav demo

test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv/bin/python -m pytest -q
