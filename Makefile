# m2f-book: two commands for a newcomer (`make book`, `make test`); each installs what it needs first.
# Everything runs inside .venv, created here on first use.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
JB     := $(VENV)/bin/jupyter-book
SHAPES := data/shapes

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYDEVD_DISABLE_FILE_VALIDATION := 1
# OpenMP threads that spin while waiting make torch ~20x slower on a busy 2-core machine
export GOMP_SPINCOUNT ?= 1000

.PHONY: book test test-py test-nb test-book book-model demo bench lint format clean help

help:
	@echo "make book   build the book into _build/html (executes every notebook)"
	@echo "make test   run every test: pytest, nbval over the notebooks, the strict book build"
	@echo "make student  the student edition (no solutions, executed) and nbgrader assignments in _build/student"
	@echo "make book-model  retrain the book's shipped model from scratch (~50 min on 2 CPU cores)"
	@echo "make demo   train -> eval -> predict on the synthetic shapes dataset (DEMO_ARGS=--solver.max_iter=300 for a short one)"
	@echo "make bench  speed/memory benchmarks against HF transformers (CPU, and GPU when present)"
	@echo "make lint   ruff check + format check"
	@echo "make clean  remove builds, generated data and runs (keeps .venv)"

# --- environment --------------------------------------------------------------------------------
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.book-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[book]"
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@ $(VENV)/.book-installed

# --- data the book needs ------------------------------------------------------------------------
$(SHAPES)/.complete: m2f_lite/data/synthetic.py | $(VENV)/.book-installed
	$(VENV)/bin/m2f-lite data synthetic --out $(SHAPES) --n-train 500 --n-val 100 --size 128 --seed 0
	touch $@

# --- the two commands ---------------------------------------------------------------------------
book: $(VENV)/.book-installed $(SHAPES)/.complete
	$(JB) build --all -W -n --keep-going .

test: $(VENV)/.dev-installed $(SHAPES)/.complete
	$(MAKE) test-py test-nb test-book

test-py:
	$(PY) -m pytest -n 2 --dist loadgroup tests

# nbval over every chapter as Colab runs it: each notebook alone in an empty folder, m2f_lite from
# a wheel installed into a fresh venv (tests/standalone.py); chapter 4 once more in full mode.
# Two kernels on two cores, one thread each.
test-nb:
	$(PY) tests/standalone.py --jobs 2 --full book/04_pixel_decoder.ipynb

test-book:
	$(JB) build --all -W -n --keep-going .

# The student edition (m2f_lite/student.py, book/instructors.md): every chapter without its solutions,
# as notebooks and as an executed jupyter-book site, and the nbgrader source notebooks.
.PHONY: student
student: $(VENV)/.dev-installed $(SHAPES)/.complete  # dev: pytest checks the output
	$(PY) -m m2f_lite.student --nbgrader --out _build/student
	$(PY) -m pytest -q -p no:cacheprovider -m student_build tests/test_student.py

# The book's model ships with the package (m2f_lite/assets/shapes_book.*, m2f_lite/book_model.py):
# nothing above trains it. This retrains it from scratch with the recorded command (fresh data and
# run folder, which must not exist), evaluates the half-precision weights that ship and rewrites the three asset files.
book-model: $(VENV)/.book-installed
	@test ! -e runs/shapes_book || { echo "make book-model: runs/shapes_book exists; move it away first"; exit 1; }
	$(VENV)/bin/m2f-lite data synthetic --out $(SHAPES) --n-train 500 --n-val 100 --size 128 --seed 0
	touch $(SHAPES)/.complete
	TQDM_MININTERVAL=60 $(VENV)/bin/m2f-lite train shapes_book --output_dir=runs/shapes_book
	$(PY) -m m2f_lite.book_model runs/shapes_book

# --- the rest -----------------------------------------------------------------------------------
DEMO_ARGS ?=
demo: $(VENV)/.book-installed $(SHAPES)/.complete
	$(VENV)/bin/m2f-lite train shapes_tiny --output_dir=runs/demo $(DEMO_ARGS)
	$(VENV)/bin/m2f-lite eval runs/demo/model_final.pt
	$(VENV)/bin/m2f-lite predict $(SHAPES)/images/val/000000.png --weights runs/demo/model_final.pt --task panoptic --out runs/demo/predict

bench: $(VENV)/.dev-installed  # GPU suites run when CUDA is present
	$(PY) benchmarks/bench_model.py
	$(PY) benchmarks/bench_model.py --tiny --size 256 --threads 1
	$(PY) benchmarks/bench_criterion.py
	if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
		$(PY) benchmarks/bench_msda.py; \
	else echo "bench_msda.py: skipped, no CUDA device (the Triton kernel's timing needs a GPU)"; fi

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf _build $(SHAPES) runs .cache .pytest_cache
