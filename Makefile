# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= data/demo
STAMP  := $(shell date +%Y%m%d-%H%M%S)
RUN_ID ?= demo-$(STAMP)

.PHONY: install libero demo test bench-tiny

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

install: $(VENV)/.installed

# Optional: the LIBERO simulator for vla-scripts/eval_libero.py (with its scene assets, ~1 GB). Without --no-deps
# hf-libero would pull its training stack; requirements-libero.txt is what evaluation imports. Rendering also
# needs Mesa's EGL (Debian: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri).
$(VENV)/.libero-installed: requirements-libero.txt $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps -r requirements-libero.txt
	touch $@

libero: $(VENV)/.libero-installed

# Synthetic LIBERO-90 data, a tiny random checkpoint and its anchor cache, then a short CRaFT run
# with the user's flags; logs go to runs/$(RUN_ID)/metrics.jsonl.
demo: install
	$(PY) vla-scripts/make_demo_assets.py --out $(DEMO)
	$(VENV)/bin/torchrun --standalone --nnodes 1 --nproc-per-node 1 vla-scripts/train_craft.py \
	  --pretrained_checkpoint $(DEMO)/model \
	  --data_root_dir $(DEMO)/rlds \
	  --vla.data_mix libero_90 \
	  --craft.enabled true \
	  --craft.retention_mode hidden \
	  --craft.anchor_cache_dir $(DEMO)/anchor_cache \
	  --craft.pooling mean_image_tokens \
	  --craft.hidden_layer -2 \
	  --craft.retention_loss_type mse \
	  --craft.epsilon 0.001 \
	  --craft.lambda_lr 50 \
	  --craft.anchor_batch_size 4 \
	  --vla.per_device_batch_size 8 \
	  --vla.learning_rate 1e-3 \
	  --vla.max_steps 40 \
	  --vla.shuffle_buffer_size 2000 \
	  --eval.interval 10 \
	  --run_root_dir runs --run_id $(RUN_ID)
	@echo "metrics: runs/$(RUN_ID)/metrics.jsonl"
	$(PY) vla-scripts/plot_run.py runs/$(RUN_ID) --projection_window 10 --out runs/$(RUN_ID)/dashboard.png

test: install
	$(PY) -m pytest -q
