# SwiftMBQ — `make demo` and `make test` work on a fresh Debian 12 machine with Swift 6.
SWIFT      ?= swift
PYTHON     ?= .venv/bin/python
APT_PKGS   := libopenblas-dev libzmq3-dev pkg-config
# AVX2 servers get haswell code (rounding and min/max loops vectorize; see README);
# anything older gets Swift's portable default.
CPU_FLAGS  := $(shell grep -q ' avx2 ' /proc/cpuinfo 2>/dev/null && echo "-Xswiftc -target-cpu -Xswiftc haswell")
RELEASE    := -c release $(CPU_FLAGS)
MBQ        := .build/release/mbq
CUDA_TOOLS := .cuda-tools
VERSION    := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

.PHONY: demo test deps cuda-tools device-check build release bench fixtures demo-model check-formats proto cluster-test dist clean

## Installs what is missing, builds in release, quantizes the committed demo VLM (Demo/)
## nine ways and compares held-out caption accuracy (docs/DEMO.md).
demo: release
	$(MBQ) demo --data Demo --out demo-out

## Installs what is missing, builds, runs every test; then builds the relocatable bundle
## and checks it under `env -i` (`make dist`).
test: deps cuda-tools
	$(SWIFT) build --build-tests
	MBQ_CUDA_LIBS=$(CURDIR)/$(CUDA_TOOLS)/lib MBQ_REQUIRE_NVRTC=1 $(SWIFT) test
	$(MAKE) dist

## NVRTC from the nvidia-cuda-nvrtc wheel (PyPI), unpacked into .cuda-tools/ once: the
## kernel-compile test builds every kernel for sm_80 and sm_90 with it (no GPU, no toolkit).
cuda-tools:
	Scripts/install-nvrtc.sh $(CUDA_TOOLS)

## System libraries from Debian (apt-get when root; otherwise says what to install).
deps:
	@if ! pkg-config --exists openblas libzmq 2>/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing $(APT_PKGS)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	  else \
	    echo "missing system libraries: run  sudo apt-get install -y $(APT_PKGS)"; exit 1; \
	  fi; \
	fi

build: deps
	$(SWIFT) build

release: deps
	$(SWIFT) build $(RELEASE) --product mbq

## GEMM and decoder-block benchmark (with .venv present also PyTorch on the same block),
## then the distributed one: streaming, and the demo job on 3 local workers.
bench: release
	$(MBQ) bench $(if $(wildcard $(PYTHON)),--torch $(PYTHON),)
	$(MBQ) bench --cluster

## Regenerates the PyTorch reference fixtures (needs network for PyPI; not used by CI).
fixtures:
	test -x $(PYTHON) || (python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && \
	  .venv/bin/pip install -q transformers safetensors numpy pillow)
	$(PYTHON) Scripts/reference/make_fixtures.py
	$(PYTHON) Scripts/reference/mbq_reference.py
	$(PYTHON) Scripts/reference/test_make_calibration.py

## Retrains the demo VLM and rewrites Demo/ (model, calibration and held-out bundles,
## training.json): PyTorch CPU, ~15 min on 2 cores (needs PyPI; not used by CI).
demo-model:
	test -x $(PYTHON) || (python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && \
	  .venv/bin/pip install -q transformers safetensors numpy pillow)
	$(PYTHON) Scripts/train_demo_vlm.py --out Demo

## Decodes every packed format with transformers / compressed-tensors / an independent
## GPTQ decoder and compares with our weights and `mbq eval` (needs PyPI; not used by CI).
check-formats: release
	test -x $(PYTHON) || (python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && \
	  .venv/bin/pip install -q transformers safetensors numpy)
	.venv/bin/pip install -q compressed-tensors frozendict
	$(PYTHON) Scripts/reference/check_formats.py --mbq $(MBQ)

## A real Slurm on this machine (slurm-wlm and munge from Debian, four node entries):
## Cluster/submit.sh runs Cluster/mbq.sbatch with 3 worker steps, output compared with one
## process (needs root; not part of `make test`, which starts no daemons).
cluster-test: release
	bash Cluster/slurm-test.sh $(MBQ)

## A relocatable bundle for machines without Swift (cluster workers): dist/mbq-VERSION-
## linux-x86_64.tar.xz, the release binary with the Swift runtime linked in and OpenBLAS,
## libzmq and their libraries under lib/; unpacked and checked under `env -i`
## (Scripts/make-dist.sh, Scripts/dist-test.sh; docs/OPERATIONS.md).
dist: release
	bash Scripts/make-dist.sh $(VERSION) $(CPU_FLAGS)

## Regenerates Sources/MBQWire/Generated from Proto/mbq.proto: Debian's protoc and
## protoc-gen-swift built from the swift-protobuf package copy SwiftPM resolved (1.39.0).
proto: deps
	command -v protoc >/dev/null || (apt-get update -qq && apt-get install -y -qq protobuf-compiler >/dev/null)
	test -x .build-protoc/release/protoc-gen-swift || ($(SWIFT) package resolve && rm -rf .build-protoc-src && \
	  cp -r .build/checkouts/swift-protobuf .build-protoc-src && cd .build-protoc-src && \
	  $(SWIFT) build -c release --product protoc-gen-swift --scratch-path ../.build-protoc)
	protoc --plugin=protoc-gen-swift=.build-protoc/release/protoc-gen-swift --swift_opt=Visibility=Public \
	  --swift_out=Sources/MBQWire/Generated -I Proto Proto/mbq.proto

clean:
	rm -rf .build .build-dist dist demo-out

## The GPU check, packed for a machine with an NVIDIA GPU and no Swift (Scripts/device-check.sh):
## dist/device-check/ and its tarball; there, Scripts/device-run.sh writes OUT/device-check.json.
device-check: dist
	Scripts/device-check.sh $(VERSION)
