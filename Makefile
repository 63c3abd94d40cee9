# Set-up and entry points. `make demo` and `make test` create or refresh .venv on their own.
PYTHON ?= python3
VENV   ?= .venv
TORCH_VERSION ?= 2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install gl demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	# The pinned torch first: a CPU host resolves the local CPU wheel, a CUDA host the CUDA build.
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[test,metaworld,libero]"
	-$(MAKE) --no-print-directory gl
	touch $(STAMP)

install: $(STAMP)

# MuJoCo's offscreen rendering on a machine without a display (MetaWorld and LIBERO): Mesa's EGL.
# Installed with apt-get when running as root on Debian/Ubuntu and missing; otherwise a hint.
# Without it the simulator tests are skipped with the reason.
GL_PACKAGES := libegl1 libegl-mesa0 libgl1-mesa-dri
gl:
	@if ldconfig -p 2>/dev/null | grep -q 'libEGL_mesa.so'; then \
		echo "offscreen GL: Mesa EGL present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(GL_PACKAGES); \
	else \
		echo "offscreen GL: install $(GL_PACKAGES) (or libosmesa6) for the MetaWorld/LIBERO simulators"; \
	fi

demo: $(STAMP)
	$(BIN)/dit4dit demo --out demo_out

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
