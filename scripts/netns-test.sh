#!/usr/bin/env bash
# A multi-host test of soma-p2p in Linux network namespaces: `make netns-test`.
#
# Five hosts, each a network namespace with one veth to a shared bridge (the
# bridge lives in a sixth namespace), addresses 10.213.0.1-5/24. One node
# process per host, listening on its own address:
#   host 1-4  validators of one genesis, each producing the same chain
#             ([producer]) up to MAX_COMMITS;
#   host 5    a fresh node, seeded only with validator-0's address.
# Every link is impaired: a tbf bandwidth limit either way, and latency
# from netem (50 ms +- 10 ms each way, 1% loss) when the kernel has it;
# where it has not, from soma-impair (crates/testkit), a userspace TCP
# forwarder in each host's namespace in front of its node: peers reach the
# node only through it (its port is the one in the genesis, the seeds and
# the node's advertised address), and it delays every byte 50 ms +- 10 ms
# each way, so a round trip between two hosts is 100 ms as with netem.
# A TCP forwarder cannot lose packets: loss is not emulated then. Once the fresh node has joined and is
# syncing, hosts 4 and 5 are partitioned: their veths are detached from the
# bridge, so each is alone, while the other three validators keep producing
# to MAX_COMMITS. The fresh node must not move while cut off. Then the
# partition heals, and the test asserts that discovery converges (every node
# knows and is connected to the other four) and that sync converges (every
# node, the fresh one included, reaches MAX_COMMITS), reporting how long each
# took after the heal, within 45 s of it. A cut-off validator goes on
# committing locally (10 commits a second) while it catches up over the
# 100 ms round trip; sync must outrun that (it takes about 10 s here), and
# a sync that keeps pace with local commits only, as one did, needs more
# than 100 s for the gap.
#
# State is read from each node's Prometheus endpoint on its own address
# (`ip netns exec <host> curl`), and once at the end with `soma-p2p status`.
# Needs root and iproute2; without them it prints SKIP and exits 0.
#
# Environment (all optional):
#   SOMA_P2P_BIN      a soma-p2p binary to use instead of building one
#   SOMA_IMPAIR_BIN   a soma-impair binary (default: beside soma-p2p)
#   CARGO             the cargo command (default: cargo)
#   CARGO_TARGET_DIR  where cargo builds (default: <repo>/target)
#   PROFILE           cargo profile to build with: release (default) or dev
#                     (CI uses dev: no second, optimised build of the whole
#                     tree; what the test build compiled with other features
#                     builds again)
#   MAX_COMMITS       commits the validators produce (default 1500)
#   COMMIT_RATE       commits/s of each validator (default 50)
#   PARTITIONED_RATE  commits/s of validator-3, the partitioned validator
#                     (default COMMIT_RATE; see docs/reliability.md before
#                     making it slower)
#   BANDWIDTH         tbf rate on every link (default 20mbit)
#   KEEP_DIR=1        keep the work directory (configs, stores, logs)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

MAX_COMMITS=${MAX_COMMITS:-1500}
PROFILE=${PROFILE:-release}
COMMIT_RATE=${COMMIT_RATE:-50}
BANDWIDTH=${BANDWIDTH:-20mbit}
COMMITS_PER_EPOCH=500 # so that the run crosses epoch boundaries
P2P_PORT=7000
PROXY_PORT=7001        # soma-impair's, in front of P2P_PORT, without netem
DELAY_MS=50            # one way, each link
JITTER_MS=10
METRICS_PORT=9100
SUBNET=10.213.0
HOSTS=5                # hosts 1..4 validators, host 5 the fresh node
FRESH=5
PARTITIONED=(4 5)      # validator-3 and the fresh node
POLL=0.25              # seconds between polls

# Unique names: this shell's pid in every namespace we create.
PREFIX="soma-nt-$$-"
BRNS="${PREFIX}br"

# What we created, so that cleanup removes exactly that.
CREATED_NS=()
PIDS=()
WORK=""
OK=0

START_MS=0
now_ms() { local t=${EPOCHREALTIME//[.,]/}; echo $((t / 1000)); }
# Seconds since the start, one decimal.
stamp() {
    local ms=$(($(now_ms) - START_MS))
    printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100))
}
say() { printf '[%6ss] %s\n' "$(stamp)" "$*"; }
# Milliseconds as seconds with one decimal.
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }

# ---------------------------------------------------------------- cleanup --

cleanup() {
    local status=$?
    set +e
    # Nodes: SIGTERM (they stop gracefully), SIGKILL after 10 s.
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    local deadline=$(($(now_ms) + 10000))
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && (($(now_ms) < deadline)); do sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    # Deleting a namespace destroys the interfaces in it: the bridges, and
    # each veth pair (one end of every pair is in the bridge namespace).
    local ns
    for ns in "${CREATED_NS[@]}"; do ip netns del "$ns" 2>/dev/null; done
    if [[ -n $WORK ]]; then
        if ((OK)) && [[ ${KEEP_DIR:-0} != 1 ]]; then
            rm -rf "$WORK"
        else
            echo "work directory kept: $WORK"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ------------------------------------------------- can we make namespaces --

skip() {
    echo "SKIP: netns-test: $* (needs root and iproute2)"
    exit 0
}
command -v ip >/dev/null 2>&1 || skip "the ip command is missing"
command -v tc >/dev/null 2>&1 || skip "the tc command is missing"
# The bridge's namespace doubles as the probe.
if ! err=$(ip netns add "$BRNS" 2>&1); then
    skip "cannot create a network namespace: ${err%%$'\n'*}"
fi
CREATED_NS+=("$BRNS")
ip -n "$BRNS" link add name br0 type bridge 2>/dev/null ||
    skip "cannot create a bridge in a network namespace"
ip -n "$BRNS" link add name probe0 type veth peer name probe1 2>/dev/null ||
    skip "cannot create a veth pair"
ip -n "$BRNS" link del probe0

START_MS=$(now_ms)

# ------------------------------------------------------------ the binary --

if [[ -n ${SOMA_P2P_BIN:-} ]]; then
    BIN=$SOMA_P2P_BIN
else
    case $PROFILE in
        release) profile_dir=release ;;
        dev) profile_dir=debug ;;
        *) echo "PROFILE must be release or dev, not '$PROFILE'" >&2; exit 2 ;;
    esac
    say "building soma-p2p and soma-impair ($PROFILE profile)"
    (cd "$ROOT" && "${CARGO:-cargo}" build --profile "$PROFILE" --locked -p soma-node -p soma-testkit --bins)
    target=${CARGO_TARGET_DIR:-$ROOT/target}
    [[ $target = /* ]] || target="$ROOT/$target"
    BIN="$target/$profile_dir/soma-p2p"
fi
[[ -x $BIN ]] || { echo "no soma-p2p binary at $BIN" >&2; exit 1; }
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
IMPAIR_BIN=${SOMA_IMPAIR_BIN:-$(dirname "$BIN")/soma-impair}
START_MS=$(now_ms) # the test's clock starts after the build

WORK=$(mktemp -d "${TMPDIR:-/tmp}/soma-netns-test.XXXXXX")

# ------------------------------------------------------------- the hosts --

ns() { echo "${PREFIX}$1"; }
addr() { echo "$SUBNET.$1"; }
name() { if (($1 == FRESH)); then echo fresh; else echo "validator-$(($1 - 1))"; fi; }

say "network: $HOSTS hosts on bridge br0 in namespace $BRNS, $SUBNET.1-$HOSTS/24"
ip -n "$BRNS" link set br0 up
for i in $(seq 1 "$HOSTS"); do
    ip netns add "$(ns "$i")"
    CREATED_NS+=("$(ns "$i")")
    # v<i> on the bridge's side, eth0 on the host's side.
    ip -n "$BRNS" link add name "v$i" type veth peer name eth0 netns "$(ns "$i")"
    ip -n "$BRNS" link set "v$i" master br0 up
    ip -n "$(ns "$i")" link set lo up
    ip -n "$(ns "$i")" addr add "$(addr "$i")/24" dev eth0
    ip -n "$(ns "$i")" link set eth0 up
done

# ----------------------------------------------------------- impairments --

# Latency and loss need sch_netem; probe it on the first host's link.
NETEM=0
if tc -n "$(ns 1)" qdisc add dev eth0 root netem delay ${DELAY_MS}ms ${JITTER_MS}ms loss 1% 2>/dev/null; then
    NETEM=1
fi
if ((!NETEM)); then
    [[ -x $IMPAIR_BIN ]] || { echo "netem unavailable and no soma-impair binary at $IMPAIR_BIN" >&2; exit 1; }
fi
for i in $(seq 1 "$HOSTS"); do
    if ((NETEM)); then
        # Every packet leaves its sender's eth0 once: 50 ms +- 10 ms one
        # way, 1% loss per packet.
        ((i == 1)) || tc -n "$(ns "$i")" qdisc add dev eth0 root netem delay ${DELAY_MS}ms ${JITTER_MS}ms loss 1%
    else
        # The host's upload.
        tc -n "$(ns "$i")" qdisc add dev eth0 root tbf rate "$BANDWIDTH" burst 32kb latency 200ms
    fi
    # The host's download (the bridge's side of its link).
    tc -n "$BRNS" qdisc add dev "v$i" root tbf rate "$BANDWIDTH" burst 32kb latency 200ms
done
if ((NETEM)); then
    say "impairments: netem delay 50ms 10ms, loss 1% on every host's eth0; tbf $BANDWIDTH towards every host"
else
    say "netem unavailable in this kernel: latency from soma-impair in front of every node, loss NOT applied"
    say "impairments: soma-impair ${DELAY_MS} ms +- ${JITTER_MS} ms each way; tbf $BANDWIDTH on every link, both directions"
fi
# The port peers reach a node on: its own, or its soma-impair's.
if ((NETEM)); then PEER_PORT=$P2P_PORT; else PEER_PORT=$PROXY_PORT; fi

# --------------------------------------------------- genesis and configs --

"$BIN" genesis --validators 4 --out "$WORK" --commits-per-epoch "$COMMITS_PER_EPOCH" \
    --base-port "$P2P_PORT" >/dev/null
# The committee's addresses are the hosts' (they are part of the genesis, so
# they are rewritten before any node starts, to the port peers reach them
# on): validator-i's entry has port P2P_PORT + i on 127.0.0.1.
for i in 0 1 2 3; do
    sed -i "s|^address = \"127.0.0.1:$((P2P_PORT + i))\"\$|address = \"$(addr $((i + 1))):$PEER_PORT\"|" \
        "$WORK/genesis.toml"
done
if [[ $(grep -c "^address = \"$SUBNET\." "$WORK/genesis.toml") != 4 ]]; then
    echo "the genesis addresses were not rewritten:" >&2
    cat "$WORK/genesis.toml" >&2
    exit 1
fi
"$BIN" keygen --out "$WORK/fresh/keys" >/dev/null
DEFAULT_CONFIG=$("$BIN" config --default)

# set_line TEXT KEY LINE: TEXT with its one `KEY = ...` line replaced.
set_line() {
    local count
    count=$(grep -c "^$2 = " <<<"$1" || true)
    if [[ $count != 1 ]]; then
        echo "expected one \`$2\` line in the default configuration, found $count" >&2
        return 1
    fi
    awk -v key="$2 = " -v line="$3" \
        'index($0, key) == 1 { print line; next } { print }' <<<"$1"
}

# write_config HOST SEEDS RATE: the node's configuration file (RATE empty:
# no production).
write_config() {
    local host=$1 seeds=$2 rate=$3 c
    c=$(set_line "$DEFAULT_CONFIG" data-dir 'data-dir = "data"')
    c=$(set_line "$c" keys-dir 'keys-dir = "keys"')
    c=$(set_line "$c" genesis 'genesis = "../genesis.toml"')
    c=$(set_line "$c" listen-address \
        "listen-address = \"$(addr "$host"):$P2P_PORT\"
metrics-address = \"$(addr "$host"):$METRICS_PORT\"")
    c=$(set_line "$c" seed-peers "seed-peers = [$seeds]")
    c=$(set_line "$c" external-addresses "external-addresses = [\"$(addr "$host"):$PEER_PORT\"]")
    c=$(set_line "$c" interval 'interval = "1s"')
    if [[ -n $rate ]]; then
        c=$(awk -v rate="$rate" -v max="$MAX_COMMITS" \
            '$0 == "[p2p]" { print "[producer]"; print "commit-rate = " rate; print "max-commits = " max; print "" } { print }' <<<"$c")
    fi
    printf '%s\n' "$c" >"$WORK/$(name "$host")/node.toml"
}

seed() { echo "{ address = \"$(addr "$1"):$PEER_PORT\" }"; }
PARTITIONED_RATE=${PARTITIONED_RATE:-10}
write_config 1 "$(seed 2)" "$COMMIT_RATE"
write_config 2 "$(seed 1)" "$COMMIT_RATE"
write_config 3 "$(seed 1)" "$COMMIT_RATE"
write_config 4 "$(seed 1)" "$PARTITIONED_RATE"
write_config "$FRESH" "$(seed 1)" "" # the fresh node: one seed, by address only

# start HOST: one node in its namespace, logging to <work>/<name>.log;
# without netem, its soma-impair first (logging to <name>.impair.log).
declare -A PID_OF
start() {
    local host=$1
    if ((!NETEM)); then
        ip netns exec "$(ns "$host")" "$IMPAIR_BIN" \
            --listen "$(addr "$host"):$PROXY_PORT" --upstream "$(addr "$host"):$P2P_PORT" \
            --delay-ms "$DELAY_MS" --jitter-ms "$JITTER_MS" --report-every-s 5 \
            </dev/null >"$WORK/$(name "$host").impair.log" 2>&1 &
        PIDS+=($!)
    fi
    ip netns exec "$(ns "$host")" "$BIN" run --config "$WORK/$(name "$host")/node.toml" \
        </dev/null >/dev/null 2>"$WORK/$(name "$host").log" &
    # `ip netns exec` execs the command: this is the node's pid.
    PIDS+=($!)
    PID_OF[$host]=$!
}

# ---------------------------------------------------------------- state --

# Per host, from its metrics: height (highest synced commit), known and
# connected peers; -1 when the endpoint does not answer.
H=() K=() C=()
# metrics HOST: the text of the node's /metrics, read inside its namespace.
metrics() {
    if command -v curl >/dev/null 2>&1; then
        ip netns exec "$(ns "$1")" curl -fsS --max-time 2 \
            "http://$(addr "$1"):$METRICS_PORT/metrics" 2>/dev/null || true
    else
        # bash's /dev/tcp instead (the inner shell expands $0 and $1).
        # shellcheck disable=SC2016
        ip netns exec "$(ns "$1")" timeout 2 bash -c \
            'exec 3<>"/dev/tcp/$0/$1" && printf "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n" "$0" >&3 && cat <&3' \
            "$(addr "$1")" "$METRICS_PORT" 2>/dev/null || true
    fi
}
snapshot() {
    local i
    for i in $(seq 1 "$HOSTS"); do
        read -r "H[i]" "K[i]" "C[i]" < <(metrics "$i" | awk '
            $1 == "soma_highest_synced_commit" { h = $2 }
            $1 == "soma_known_peers" { k = $2 }
            $1 == "soma_connected_peers" { c = $2 }
            END { print (h == "" ? -1 : h), (k == "" ? -1 : k), (c == "" ? -1 : c) }')
    done
}
state() {
    local i out=""
    for i in $(seq 1 "$HOSTS"); do
        out+="$(name "$i") h=${H[i]} k=${K[i]} c=${C[i]}  "
    done
    echo "$out"
}

fail() {
    echo
    echo "FAIL: netns-test: $*"
    snapshot || true
    echo "last state: $(state)"
    local i
    for i in $(seq 1 "$HOSTS"); do
        echo "----- $(name "$i") ($(addr "$i")): metrics -----"
        metrics "$i" | grep -E '^soma_(highest|known|connected|banned|commits|worker|verification)' || true
        echo "----- $(name "$i") ($(addr "$i")): last 25 log lines -----"
        tail -n 25 "$WORK/$(name "$i").log" 2>/dev/null || true
    done
    exit 1
}

alive() {
    local i
    for i in "${!PID_OF[@]}"; do
        kill -0 "${PID_OF[$i]}" 2>/dev/null || fail "the node of $(name "$i") exited"
    done
}

# wait_for DESCRIPTION SECONDS PREDICATE: polls PREDICATE on fresh state
# until it holds; fails after SECONDS.
wait_for() {
    local deadline=$(($(now_ms) + $2 * 1000))
    while :; do
        alive
        snapshot
        if "$3"; then return 0; fi
        (($(now_ms) < deadline)) || fail "timed out after $2 s waiting for: $1"
        sleep "$POLL"
    done
}

# ------------------------------------------------------------ predicates --

validators_meshed() {
    local i
    for i in 1 2 3 4; do ((K[i] == 3 && C[i] == 3)) || return 1; done
}
fresh_joined() { ((K[FRESH] == 4 && C[FRESH] == 4 && H[FRESH] > 0)); }
partition_seen() {
    local i
    # The majority connected only among itself, the cut-off hosts to no one.
    for i in 1 2 3; do ((C[i] == 2)) || return 1; done
    for i in "${PARTITIONED[@]}"; do ((C[i] == 0)) || return 1; done
}
majority_done() {
    local i
    for i in 1 2 3; do ((H[i] == MAX_COMMITS)) || return 1; done
}
discovery_converged() {
    local i
    for i in $(seq 1 "$HOSTS"); do ((K[i] == 4 && C[i] == 4)) || return 1; done
}
sync_converged() {
    local i
    for i in $(seq 1 "$HOSTS"); do ((H[i] == MAX_COMMITS)) || return 1; done
}

# ------------------------------------------------------------------ test --

say "validators: $COMMIT_RATE commits/s each (validator-3: $PARTITIONED_RATE), up to $MAX_COMMITS, $COMMITS_PER_EPOCH per epoch"
for i in 1 2 3 4; do start "$i"; done
wait_for "the validators to know and connect to each other" 30 validators_meshed
say "validators meshed: $(state)"

start "$FRESH"
say "fresh node started on $(addr "$FRESH"), seeded with $(addr 1):$PEER_PORT only"
wait_for "the fresh node to discover every validator and start syncing" 30 fresh_joined
say "fresh node joined: $(state)"

# The partition: hosts 4 and 5 lose the bridge. Their links stay up, so
# their packets are dropped silently, as on a cut cable upstream.
for i in "${PARTITIONED[@]}"; do ip -n "$BRNS" link set "v$i" nomaster; done
PART_MS=$(now_ms)
say "partition: $(name 4) and fresh detached from the bridge"
wait_for "every node to notice the partition" 60 partition_seen
FRESH_CUT=${H[FRESH]}
say "partition noticed after $(secs $(($(now_ms) - PART_MS))) s: $(state)"
wait_for "the majority to produce $MAX_COMMITS commits during the partition" 60 majority_done
((H[FRESH] == FRESH_CUT)) ||
    fail "the fresh node moved from $FRESH_CUT to ${H[FRESH]} while cut off"
PART_HEIGHTS="fresh ${H[FRESH]}, $(name 4) ${H[4]}"
say "majority at $MAX_COMMITS, cut off: $PART_HEIGHTS"

# Heal.
for i in "${PARTITIONED[@]}"; do ip -n "$BRNS" link set "v$i" master br0; done
HEAL_MS=$(now_ms)
say "healed after $(secs $((HEAL_MS - PART_MS))) s of partition"
DISC_MS=0 SYNC_MS=0
deadline=$((HEAL_MS + 45000))
while :; do
    alive
    snapshot
    if ((DISC_MS == 0)) && discovery_converged; then
        DISC_MS=$(now_ms)
        say "discovery converged: every node knows and is connected to the 4 others"
    fi
    if ((SYNC_MS == 0)) && sync_converged; then
        SYNC_MS=$(now_ms)
        say "sync converged: every node at $MAX_COMMITS"
    fi
    ((DISC_MS == 0 || SYNC_MS == 0)) || break
    (($(now_ms) < deadline)) || fail "no convergence within 45 s of the heal"
    sleep "$POLL"
done
FETCHED=$(metrics "$FRESH" | awk '$1 == "soma_bytes_fetched_total" { print $2 }')

# The same from the wire: `soma-p2p status` on every node, asked from the
# fresh node's host.
echo
echo "soma-p2p status of every node (asked from the fresh node's host):"
for i in $(seq 1 "$HOSTS"); do
    out=$(ip netns exec "$(ns "$FRESH")" "$BIN" status --addr "$(addr "$i"):$P2P_PORT") ||
        fail "soma-p2p status failed on $(name "$i")"
    highest=$(awk '$1 == "highest" { print $2 }' <<<"$out")
    peers=$(awk '$1 == "peers" { print $2 }' <<<"$out")
    health=$(awk '$1 == "health" { $1 = ""; print substr($0, 2) }' <<<"$out")
    printf '  %-12s %-16s highest %-6s peers %-3s %s\n' "$(name "$i")" "$(addr "$i"):$P2P_PORT" \
        "$highest" "$peers" "$health"
    [[ $highest == "$MAX_COMMITS" ]] || fail "status of $(name "$i") reports highest $highest"
done

# How often the shapers held packets back (tbf's overlimits), every link.
overlimits() {
    tc -s "${@}" | awk '{ gsub(/[(),]/, ""); for (f = 1; f < NF; f++) if ($f == "overlimits") n += $(f + 1) }
        END { print n + 0 }'
}
shaped=0
for i in $(seq 1 "$HOSTS"); do
    shaped=$((shaped + $(overlimits -n "$BRNS" qdisc show dev "v$i")))
    ((NETEM)) || shaped=$((shaped + $(overlimits -n "$(ns "$i")" qdisc show dev eth0)))
done

echo
if ((NETEM)); then
    echo "impairments: netem delay ${DELAY_MS}ms ${JITTER_MS}ms loss 1%, tbf $BANDWIDTH (tbf overlimits: $shaped)"
else
    # The forwarders' last counters: connections and bytes through them.
    through=$(for i in $(seq 1 "$HOSTS"); do tail -n 1 "$WORK/$(name "$i").impair.log"; done |
        awk '{ gsub(/[,{}]/, " "); for (f = 1; f < NF; f++) { if ($f == "connections:") c += $(f + 1); if ($f == "bytes_up:" || $f == "bytes_down:") b += $(f + 1) } }
            END { printf "%d connections, %d bytes", c, b }')
    echo "impairments: soma-impair ${DELAY_MS}ms +- ${JITTER_MS}ms each way (no loss: netem unavailable in this kernel), tbf $BANDWIDTH (tbf overlimits: $shaped); through the forwarders: $through"
fi
echo "partition: $(secs $((HEAL_MS - PART_MS))) s; heights when healed: $PART_HEIGHTS, majority $MAX_COMMITS"
echo "after heal: discovery converged in $(secs $((DISC_MS - HEAL_MS))) s, sync converged in $(secs $((SYNC_MS - HEAL_MS))) s"
echo "fresh node: $MAX_COMMITS commits, ${FETCHED:-?} bytes of blocks fetched in all"
echo "PASS: netns-test: 5 hosts, partition healed, all nodes at $MAX_COMMITS, test time $(stamp) s"
OK=1
