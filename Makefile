# soma-p2p developer commands. `make test` is what CI runs.
CARGO ?= cargo
# nextest runs test binaries in parallel; plain `cargo test` is the fallback.
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all build test lint fmt bench demo fuzz doc clean

all: build

## build: compile every crate and test target
build:
	$(CARGO) build --workspace --all-targets --locked

## test: the whole workspace's tests (unit, integration, doc)
test:
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --workspace --locked --no-fail-fast
	$(CARGO) test --workspace --doc --locked
else
	$(CARGO) test --workspace --locked --no-fail-fast
endif

## lint: formatting check and clippy with warnings as errors
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## demo: build and run the local network demo (4 validators, a fresh node syncs)
demo:
	$(CARGO) run --release --locked -p soma-node -- localnet --nodes 4 --commits 5000

## bench: release-mode benchmarks (figures go in docs/benchmarks.md)
bench:
	$(CARGO) bench -p soma-chain --bench foundation --locked
	$(CARGO) bench -p soma-actors --bench verifier --locked
	$(CARGO) bench -p soma-actors --bench grpc --locked
	$(CARGO) bench -p soma-actors --bench discovery --locked
	$(CARGO) bench -p soma-actors --bench sync --locked
	$(CARGO) bench -p soma-node --bench memory --locked

## fuzz: run every fuzz target for FUZZ_SECONDS each (needs nightly and cargo-fuzz);
## crashers land in fuzz/artifacts: copy each into fuzz/regressions/<target>/
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := decode_block decode_commit node_infos proto_conversions commit_batch
fuzz:
	@command -v cargo-fuzz >/dev/null || { echo "install cargo-fuzz: cargo install cargo-fuzz"; exit 2; }
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

## doc: API documentation
doc:
	$(CARGO) doc --workspace --no-deps --locked

clean:
	$(CARGO) clean
