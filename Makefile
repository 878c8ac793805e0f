# soma-p2p developer commands. `make test` is what CI runs.
CARGO ?= cargo
# nextest runs test binaries in parallel; plain `cargo test` is the fallback.
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: all build test lint deny no-test-hooks fmt bench bench-quick bench-micro sim demo soak fuzz doc netns-test archive-s3-test clean

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

## lint: formatting check, clippy and rustdoc with warnings as errors, the dependency policy,
## and no test hook in the node binary's build
lint: deny no-test-hooks
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	# The library as an embedder without object stores builds it (no `cloud`).
	$(CARGO) clippy -p soma-actors --lib --locked -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --locked

## deny: dependency policy (deny.toml): licences, sources, bans, and security
## advisories when the advisory database (github.com) can be fetched.
## Installs cargo-deny from crates.io if it is missing.
CARGO_DENY_VERSION := 0.20.2
deny:
	@$(CARGO) deny --version >/dev/null 2>&1 || $(CARGO) install cargo-deny --locked --version $(CARGO_DENY_VERSION)
	$(CARGO) deny -L error check bans licenses sources
	@if $(CARGO) deny -L error fetch db >/dev/null 2>&1; then \
		$(CARGO) deny -L error --offline check advisories; \
	else \
		echo "deny: advisory database unreachable (github.com/RustSec/advisory-db): advisories NOT checked here;"; \
		echo "deny: run 'cargo deny check advisories' on a machine that reaches github.com"; \
	fi

## no-test-hooks: no build of the workspace's programs (`cargo build`, with or
## without `--workspace`; tests aside) carries a `testing` feature (fault
## injection, forged identities): only dev-dependencies enable them
no-test-hooks:
	@if $(CARGO) tree --workspace -e normal -f '{p} {f}' --locked | grep -q 'testing'; then \
		echo "no-test-hooks: a 'testing' feature reaches a build of the programs:"; \
		$(CARGO) tree --workspace -e normal -f '{p} {f}' --locked | grep testing; exit 1; \
	else echo "no-test-hooks: no program of the workspace carries a testing feature"; fi

## fmt: format the code
fmt:
	$(CARGO) fmt --all

## archive-s3-test: the archive tests against a real S3-compatible server:
## installs s3s-fs from crates.io into target/tools (once, a few minutes),
## then runs the S3 test of actors/tests/archive.rs with it (on the build
## `make test` made). The test is ignored by `make test`, which has no
## S3 server to run it against.
S3S_FS_VERSION := 0.14.1
archive-s3-test:
	@test -x target/tools/bin/s3s-fs || $(CARGO) install s3s-fs --locked --version $(S3S_FS_VERSION) --features binary --root target/tools
ifeq ($(NEXTEST),yes)
	SOMA_S3S_FS=$(CURDIR)/target/tools/bin/s3s-fs $(CARGO) nextest run --workspace --locked --no-capture --run-ignored only -E 'binary(archive) & test(s3)'
else
	SOMA_S3S_FS=$(CURDIR)/target/tools/bin/s3s-fs $(CARGO) test --workspace --locked --test archive -- --ignored --nocapture s3
endif

## demo: build and run the local network demo (4 validators, a fresh node syncs)
demo:
	$(CARGO) run --release --locked -p soma-node -- localnet --nodes 4 --commits 5000

## soak: the soak test in release mode for SOAK_SECONDS (default 600): three
## validator processes, a syncing node with pruning and a slow executor under
## caller churn, validator restarts and actor panics, sampled every 10 s; it
## fails if a sample grows past its limit. Writes target/soak/samples.csv,
## summary.txt and samples.svg. `make test` runs a 60 s version.
SOAK_SECONDS ?= 600
soak:
	SOAK_SECONDS=$(SOAK_SECONDS) $(CARGO) test --release --locked -p soma-node --test soak -- --nocapture

## bench: the benchmark harness in release mode: prints every figure beside its
## reference and writes docs/benchmarks.md and docs/benchmarks.json (under 15 min)
bench:
	$(CARGO) run --release --locked -p soma-bench

## sim: networks of 1,000 and 10,000 simulated nodes (the production Discovery,
## PeerHeights and StateSync cores in virtual time): convergence, churn, partition,
## eclipse, newcomers joining full tables, heights, a catch-up among hostile peers,
## the real-node discovery benchmark simulated, and an hour of churn at
## 2,000 nodes; writes docs/simulation.md, on every core (long: docs/benchmarks.md,
## "The simulator's speed"; `--only` runs a part, `--hour-nodes 10000` the long run at 10,000)
sim:
	$(CARGO) run --release --locked -p soma-sim

## bench-quick: every benchmark at a tiny size (about a minute), written under target/bench-quick/
bench-quick:
	$(CARGO) run --release --locked -p soma-bench -- --quick

## bench-micro: criterion microbenchmarks of signatures, codec and batch verification
bench-micro:
	$(CARGO) bench -p soma-chain --bench foundation --locked

## fuzz: run every fuzz target for FUZZ_SECONDS each (needs nightly and cargo-fuzz);
## it starts from the seeds in fuzz/regressions/<target>/; crashers land in
## fuzz/artifacts: copy each into fuzz/regressions/<target>/
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := decode_block decode_commit node_infos proto_conversions commit_batch
fuzz:
	@command -v cargo-fuzz >/dev/null || { echo "install cargo-fuzz: cargo install cargo-fuzz"; exit 2; }
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t; \
		cargo +nightly fuzz run $$t corpus/$$t regressions/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 || exit 1; \
	done

## doc: API documentation
doc:
	$(CARGO) doc --workspace --no-deps --locked

## netns-test: 5 nodes on separate hosts (network namespaces): impaired links,
## a partition that heals; needs root and iproute2, else prints SKIP
netns-test:
	CARGO="$(CARGO)" bash scripts/netns-test.sh

clean:
	$(CARGO) clean
