//! The bounds a [`P2pConfig`] must keep to. Outside them a node could
//! spin (a zero interval), panic (a zero channel capacity, a deadline past
//! what a clock holds), never answer (fetch caps of zero) or never be
//! discovered (more addresses than peers take); `P2pBuilder::start`
//! refuses such a config before it starts anything. These are the limits
//! of what works, not advice: the node binary holds its configuration
//! file to narrower ranges an operator should keep to.

use std::fmt::Display;
use std::time::Duration;

use super::P2pConfig;
use crate::discovery;
use crate::state_sync::Retention;

/// A setting of a [`P2pConfig`] outside what the node works with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("P2pConfig::{field} must be {allowed}, got {got}")]
pub struct InvalidSetting {
    /// The field, as a path from `P2pConfig` (`discovery.interval_ms`).
    pub field: &'static str,
    /// The values allowed.
    pub allowed: &'static str,
    /// The value given.
    pub got: String,
}

fn holds(
    field: &'static str,
    ok: bool,
    allowed: &'static str,
    got: impl Display,
) -> Result<(), InvalidSetting> {
    if ok {
        return Ok(());
    }
    Err(InvalidSetting {
        field,
        allowed,
        got: got.to_string(),
    })
}

/// The longest any interval, timeout or grace may be: far enough for any
/// use, near enough that a deadline this far ahead is one a clock holds.
const LONGEST: Duration = Duration::from_secs(365 * 86_400);
const LONGEST_TEXT: &str = "between 1ms and 365 days";

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

impl P2pConfig {
    /// Whether every setting is one the node works with; if not, the first
    /// that is not, named by its field. `P2pBuilder::start` runs this
    /// before it starts anything.
    pub fn check(&self) -> Result<(), InvalidSetting> {
        self.check_addresses()?;
        self.check_durations()?;
        self.check_counts()?;
        self.check_relations()
    }

    fn check_addresses(&self) -> Result<(), InvalidSetting> {
        let field = "external_addresses";
        // Peers refuse a node's info whole for one address they refuse: a
        // node advertising one would never be discovered.
        let allow_private = self.discovery.allow_private_addresses;
        for address in &self.external_addresses {
            let canonical = discovery::canonical_address(address);
            holds(
                field,
                discovery::is_advertisable(&canonical, allow_private),
                "addresses peers accept (soma_actors::discovery::is_advertisable)",
                address,
            )?;
        }
        // Nor does a peer take an info with more addresses than the
        // protocol's limit; spellings of one address count once.
        let most = soma_types::Limits::default().max_node_addresses;
        let advertised: std::collections::BTreeSet<String> = (self.external_addresses.iter())
            .map(|a| discovery::canonical_address(a))
            .collect();
        holds(
            field,
            advertised.len() <= most,
            "at most 4 distinct addresses (peers refuse an info with more)",
            format!("{} addresses", advertised.len()),
        )
    }

    fn check_durations(&self) -> Result<(), InvalidSetting> {
        let (d, s, c, g) = (
            &self.discovery,
            &self.state_sync,
            &self.connections,
            &self.grpc,
        );
        // Each at least 1ms: a zero interval fires without end, a zero
        // timeout fails every call.
        let mut at_least_1ms = vec![
            ("tick", self.tick),
            ("height_query_interval", self.height_query_interval),
            ("timeout", self.timeout),
            ("ban_duration", self.ban_duration),
            (
                "supervision.restart_window_ms",
                millis(self.supervision.restart_window_ms),
            ),
            (
                "connections.connect_timeout_ms",
                millis(c.connect_timeout_ms),
            ),
            ("connections.probe_interval_ms", millis(c.probe_interval_ms)),
            ("discovery.interval_ms", millis(d.interval_ms)),
            (
                "discovery.node_info_max_age_ms",
                millis(d.node_info_max_age_ms),
            ),
            ("discovery.dial_backoff_ms", millis(d.dial_backoff_ms)),
            (
                "discovery.max_dial_backoff_ms",
                millis(d.max_dial_backoff_ms),
            ),
            (
                "discovery.pending_dial_timeout_ms",
                millis(d.pending_dial_timeout_ms),
            ),
            (
                "state_sync.wait_interval_when_no_peer_ms",
                millis(s.wait_interval_when_no_peer_ms),
            ),
            ("state_sync.restart_window_ms", millis(s.restart_window_ms)),
            (
                "state_sync.max_write_backoff_ms",
                millis(s.max_write_backoff_ms),
            ),
            ("prune.interval_ms", millis(self.prune.interval_ms)),
            ("grpc.send_timeout", g.send_timeout),
            ("grpc.fetch_stall_timeout", g.fetch_stall_timeout),
            ("grpc.http2_keepalive_interval", g.http2_keepalive_interval),
            ("grpc.http2_keepalive_timeout", g.http2_keepalive_timeout),
            ("grpc.max_connection_age", g.max_connection_age),
            ("grpc.max_connection_age_grace", g.max_connection_age_grace),
            ("grpc.tls_handshake_timeout", g.tls_handshake_timeout),
            ("grpc.inbound_idle_timeout", g.inbound_idle_timeout),
        ];
        if let Some(a) = &self.archive {
            at_least_1ms.extend([
                ("archive.interval", a.interval),
                ("archive.request_timeout", a.request_timeout),
                ("archive.min_retry", a.min_retry),
                ("archive.max_retry", a.max_retry),
            ]);
        }
        for (field, value) in at_least_1ms {
            let ok = millis(1) <= value && value <= LONGEST;
            holds(field, ok, LONGEST_TEXT, format!("{}ms", value.as_millis()))?;
        }
        // Zero means never (rotation), no wait (backoff, grace), or no age
        // asked (eviction).
        for (field, value) in [
            ("discovery.rotation_interval_ms", d.rotation_interval_ms),
            ("discovery.min_evict_age_ms", d.min_evict_age_ms),
            ("state_sync.restart_backoff_ms", s.restart_backoff_ms),
            ("prune.grace_ms", self.prune.grace_ms),
        ] {
            let ok = millis(value) <= LONGEST;
            holds(field, ok, "at most 365 days", format!("{value}ms"))?;
        }
        Ok(())
    }

    fn check_counts(&self) -> Result<(), InvalidSetting> {
        let (d, s, g, v) = (
            &self.discovery,
            &self.state_sync,
            &self.grpc,
            &self.verifier,
        );
        let n = |x: usize| x as u64;
        const MILLION: u64 = 1_000_000;
        const GIB: u64 = 1 << 30;
        // (field, value, least, most, allowed)
        #[rustfmt::skip]
        let mut counts = vec![
            ("mailbox_capacity", n(self.mailbox_capacity), 1, 1 << 24, "between 1 and 16777216"),
            ("max_fetches_per_peer", n(self.max_fetches_per_peer), 1, 65_536, "between 1 and 65536"),
            ("max_waiting_fetches", n(self.max_waiting_fetches), 1, 1 << 24, "between 1 and 16777216"),
            ("max_local_writes", n(self.max_local_writes), 1, 1 << 20, "between 1 and 1048576"),
            ("supervision.max_restarts", u64::from(self.supervision.max_restarts), 0, MILLION, "at most 1000000"),
            ("synced_commit_broadcast_capacity", n(self.synced_commit_broadcast_capacity), 1, 1 << 20, "between 1 and 1048576"),
            ("synced_commit_read_bytes", n(self.synced_commit_read_bytes), 1, GIB, "between 1 and 1073741824"),
            ("peer_event_broadcast_capacity", n(self.peer_event_broadcast_capacity), 1, 1 << 20, "between 1 and 1048576"),
            ("connections.max_connections", n(self.connections.max_connections), 1, 1 << 20, "between 1 and 1048576"),
            ("discovery.peers_to_query", n(d.peers_to_query), 1, 1 << 20, "between 1 and 1048576"),
            ("discovery.target_concurrent_connections", n(d.target_concurrent_connections), 0, 1 << 20, "at most 1048576"),
            ("discovery.max_peers_to_send", n(d.max_peers_to_send), 1, 1 << 20, "between 1 and 1048576"),
            ("discovery.max_known_peers", n(d.max_known_peers), 1, 1 << 24, "between 1 and 16777216"),
            ("discovery.max_new_peers_per_source_per_interval", n(d.max_new_peers_per_source_per_interval), 1, 1 << 24, "between 1 and 16777216"),
            ("discovery.get_known_peers_rate_limit", u64::from(d.get_known_peers_rate_limit), 1, MILLION, "between 1 and 1000000"),
            ("state_sync.commit_sync_batch_size", s.commit_sync_batch_size, 1, MILLION, "between 1 and 1000000"),
            ("state_sync.parallel_fetches", n(s.parallel_fetches), 1, 65_536, "between 1 and 65536"),
            ("state_sync.commit_fetches_ahead", n(s.commit_fetches_ahead), 0, 65_536, "at most 65536"),
            ("state_sync.batches_ahead", n(s.batches_ahead), 1, 65_536, "between 1 and 65536"),
            ("state_sync.max_total_fetched_bytes", s.max_total_fetched_bytes, 1, 1 << 40, "between 1 and 1099511627776"),
            ("state_sync.max_hedged_bytes", s.max_hedged_bytes, 0, 1 << 40, "at most 1099511627776"),
            ("state_sync.max_blocks_per_fetch", n(s.max_blocks_per_fetch), 1, MILLION, "between 1 and 1000000"),
            ("state_sync.max_bytes_per_fetch", s.max_bytes_per_fetch, 1, 1 << 40, "between 1 and 1099511627776"),
            ("state_sync.max_restarts", u64::from(s.max_restarts), 0, MILLION, "at most 1000000"),
            ("prune.batch_commits", self.prune.batch_commits, 1, 1 << 40, "between 1 and 1099511627776"),
            ("prune.max_steps_per_run", u64::from(self.prune.max_steps_per_run), 1, MILLION, "between 1 and 1000000"),
            ("grpc.commit_sync_batch_size", g.commit_sync_batch_size, 1, MILLION, "between 1 and 1000000"),
            ("grpc.max_blocks_per_fetch", n(g.max_blocks_per_fetch), 1, MILLION, "between 1 and 1000000"),
            ("grpc.max_fetch_response_bytes", n(g.max_fetch_response_bytes), 1 << 10, GIB, "between 1024 and 1073741824"),
            ("grpc.answer_cache_bytes", n(g.answer_cache_bytes), 0, 1 << 40, "at most 1099511627776"),
            ("grpc.max_concurrent_fetches", n(g.max_concurrent_fetches), 1, 1 << 20, "between 1 and 1048576"),
            ("grpc.max_buffered_bytes_per_connection", n(g.max_buffered_bytes_per_connection), 1 << 10, 1 << 40, "between 1024 and 1099511627776"),
            ("grpc.max_unwritten_bytes_per_connection", n(g.max_unwritten_bytes_per_connection), 1 << 10, 1 << 40, "between 1024 and 1099511627776"),
            ("grpc.max_concurrent_streams", u64::from(g.max_concurrent_streams), 1, MILLION, "between 1 and 1000000"),
            ("grpc.concurrency_limit_per_connection", n(g.concurrency_limit_per_connection), 1, MILLION, "between 1 and 1000000"),
            ("grpc.max_inbound_connections", n(g.max_inbound_connections), 1, 1 << 24, "between 1 and 16777216"),
            ("grpc.max_inbound_per_prefix", n(g.max_inbound_per_prefix), 1, 1 << 24, "between 1 and 16777216"),
            ("grpc.max_rate_limited", n(g.max_rate_limited), 1, 1 << 24, "between 1 and 16777216"),
            ("grpc.cheap_calls_per_second", u64::from(g.cheap_calls_per_second), 0, 1 << 30, "at most 1073741824 (0: no refill)"),
            ("grpc.cheap_call_burst", u64::from(g.cheap_call_burst), 1, 1 << 30, "between 1 and 1073741824"),
            ("grpc.known_peers_calls_per_minute", u64::from(g.known_peers_calls_per_minute), 0, 1 << 30, "at most 1073741824 (0: no refill)"),
            ("grpc.known_peers_burst", u64::from(g.known_peers_burst), 1, 1 << 30, "between 1 and 1073741824"),
            ("grpc.abandoned_fetches_per_minute", u64::from(g.abandoned_fetches_per_minute), 0, 1 << 30, "at most 1073741824 (0: no refill)"),
            ("grpc.abandoned_fetch_burst", u64::from(g.abandoned_fetch_burst), 1, 1 << 30, "between 1 and 1073741824"),
            ("verifier.threads", n(v.threads), 1, 1 << 16, "between 1 and 65536"),
            ("verifier.queue_capacity", n(v.queue_capacity), 1, 1 << 24, "between 1 and 16777216"),
            ("verifier.key_cache_capacity", n(v.key_cache_capacity), 1, 1 << 24, "between 1 and 16777216"),
            ("verifier.merge_blocks_per_thread", n(v.merge_blocks_per_thread), 1, 1 << 24, "between 1 and 16777216"),
            ("verifier.max_committees", n(v.max_committees), 1, 1 << 20, "between 1 and 1048576"),
            // What peers may send: each at least 1, or every answer is
            // refused and its peer banned; bounded, or reservations
            // computed from them overflow.
            ("verifier.limits.max_transaction_payload_bytes", n(v.limits.max_transaction_payload_bytes), 1, GIB, "between 1 and 1073741824"),
            ("verifier.limits.max_transactions_per_block", n(v.limits.max_transactions_per_block), 1, 1 << 24, "between 1 and 16777216"),
            ("verifier.limits.max_block_bytes", n(v.limits.max_block_bytes), 1, GIB, "between 1 and 1073741824"),
            ("verifier.limits.max_votes_per_block", n(v.limits.max_votes_per_block), 1, 1 << 24, "between 1 and 16777216"),
            ("verifier.limits.max_blocks_per_commit", n(v.limits.max_blocks_per_commit), 1, 1 << 24, "between 1 and 16777216"),
            ("verifier.limits.max_commit_bytes", n(v.limits.max_commit_bytes), 1, GIB, "between 1 and 1073741824"),
            ("verifier.limits.max_commits_per_batch", n(v.limits.max_commits_per_batch), 1, MILLION, "between 1 and 1000000"),
            ("verifier.limits.max_node_addresses", n(v.limits.max_node_addresses), 1, 1 << 10, "between 1 and 1024"),
            ("verifier.limits.max_address_bytes", n(v.limits.max_address_bytes), 1, 1 << 16, "between 1 and 65536"),
            ("verifier.limits.max_node_info_bytes", n(v.limits.max_node_info_bytes), 1, 1 << 24, "between 1 and 16777216"),
            ("verifier.limits.node_info_max_age_ms", v.limits.node_info_max_age_ms, 1, 365 * 86_400_000, "between 1ms and 365 days"),
            ("verifier.limits.node_info_max_skew_ms", v.limits.node_info_max_skew_ms, 0, 365 * 86_400_000, "at most 365 days"),
        ];
        if let Some(a) = &self.archive {
            counts.extend([
                (
                    "archive.max_object_bytes",
                    a.max_object_bytes,
                    1 << 20,
                    soma_types::codec::MAX_DECODE_BYTES as u64,
                    "between 1048576 and 67108864 (the most a batch is decoded from)",
                ),
                (
                    "archive.cached_batches",
                    n(a.cached_batches),
                    1,
                    1 << 20,
                    "between 1 and 1048576",
                ),
            ]);
        }
        for (field, value, least, most, allowed) in counts {
            holds(field, (least..=most).contains(&value), allowed, value)?;
        }
        holds(
            "prune.retention",
            !matches!(
                self.prune.retention,
                Retention::Commits(0) | Retention::Epochs(0)
            ),
            "All, or Commits or Epochs of at least 1",
            format!("{:?}", self.prune.retention),
        )?;
        if let Some(a) = &self.archive {
            holds(
                "archive.url",
                !a.url.trim().is_empty(),
                "not empty",
                format!("{:?}", a.url),
            )?;
        }
        Ok(())
    }

    /// Settings bounded by others.
    fn check_relations(&self) -> Result<(), InvalidSetting> {
        let (d, g) = (&self.discovery, &self.grpc);
        let within =
            |field, value: usize, most: usize, allowed| holds(field, value <= most, allowed, value);
        within(
            "discovery.max_known_peers_per_source",
            d.max_known_peers_per_source,
            d.max_known_peers,
            "at most discovery.max_known_peers",
        )?;
        within(
            "discovery.max_known_peers_per_prefix",
            d.max_known_peers_per_prefix,
            d.max_known_peers,
            "at most discovery.max_known_peers",
        )?;
        // Dials past Connections' limit are refused as `LimitReached`, which
        // Discovery takes as the peer failing: it would back off from good
        // peers every round. At its target it still dials one more, to
        // rotate: the limit must leave room for it.
        holds(
            "discovery.target_concurrent_connections",
            d.target_concurrent_connections < self.connections.max_connections,
            "less than connections.max_connections",
            d.target_concurrent_connections,
        )?;
        holds(
            "discovery.dial_backoff_ms",
            d.dial_backoff_ms <= d.max_dial_backoff_ms,
            "at most discovery.max_dial_backoff_ms",
            format!("{}ms", d.dial_backoff_ms),
        )?;
        for (field, value) in [
            (
                "discovery.max_known_peers_per_source",
                d.max_known_peers_per_source,
            ),
            (
                "discovery.max_known_peers_per_prefix",
                d.max_known_peers_per_prefix,
            ),
            (
                "grpc.max_concurrent_fetches_per_peer",
                g.max_concurrent_fetches_per_peer,
            ),
            (
                "grpc.max_concurrent_fetches_per_network",
                g.max_concurrent_fetches_per_network,
            ),
            (
                "grpc.max_concurrent_fetches_per_host",
                g.max_concurrent_fetches_per_host,
            ),
            ("grpc.max_inbound_per_ip", g.max_inbound_per_ip),
        ] {
            holds(field, value >= 1, "at least 1", value)?;
        }
        // Answers longer than the verifier takes are refused, and their
        // peers banned: a node asking for more would ban honest peers, one
        // serving more would be banned by them.
        let most = self.verifier.limits.max_commits_per_batch as u64;
        for (field, value) in [
            (
                "state_sync.commit_sync_batch_size",
                self.state_sync.commit_sync_batch_size,
            ),
            ("grpc.commit_sync_batch_size", g.commit_sync_batch_size),
        ] {
            let allowed = "at most verifier.limits.max_commits_per_batch";
            holds(field, value <= most, allowed, value)?;
        }
        within(
            "grpc.reserved_inbound_connections",
            g.reserved_inbound_connections,
            g.max_inbound_connections.saturating_sub(1),
            "below grpc.max_inbound_connections",
        )?;
        within(
            "grpc.max_inbound_per_ip",
            g.max_inbound_per_ip,
            g.max_inbound_per_prefix,
            "between 1 and grpc.max_inbound_per_prefix",
        )?;
        if let Some(a) = &self.archive {
            holds(
                "archive.min_retry",
                a.min_retry <= a.max_retry,
                "at most archive.max_retry",
                format!("{}ms", a.min_retry.as_millis()),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(change: impl FnOnce(&mut P2pConfig)) -> InvalidSetting {
        let mut config = P2pConfig::default();
        change(&mut config);
        config.check().expect_err("refused")
    }

    #[test]
    fn the_defaults_pass() {
        assert_eq!(P2pConfig::default().check(), Ok(()));
        let config = P2pConfig {
            archive: Some(crate::archive::Config::new("/tmp/archive")),
            ..P2pConfig::default()
        };
        assert_eq!(config.check(), Ok(()));
    }

    #[test]
    fn settings_the_node_cannot_work_with_are_named() {
        let e = refused(|c| c.tick = Duration::ZERO);
        assert_eq!(
            e,
            InvalidSetting {
                field: "tick",
                allowed: "between 1ms and 365 days",
                got: "0ms".into(),
            }
        );
        assert_eq!(
            e.to_string(),
            "P2pConfig::tick must be between 1ms and 365 days, got 0ms"
        );
        // A duration past what milliseconds in u64 count is not wrapped
        // into range.
        let e = refused(|c| c.timeout = Duration::from_secs(u64::MAX));
        assert_eq!(e.field, "timeout");
        let e = refused(|c| c.discovery.interval_ms = 0);
        assert_eq!(e.field, "discovery.interval_ms");
        // Zero means never for rotation; past a year is refused.
        assert_eq!(
            refused(|c| c.discovery.rotation_interval_ms = u64::MAX).field,
            "discovery.rotation_interval_ms"
        );
        let mut config = P2pConfig::default();
        config.discovery.rotation_interval_ms = 0;
        assert_eq!(config.check(), Ok(()));
        let e = refused(|c| c.peer_event_broadcast_capacity = 0);
        assert_eq!(
            (e.field, e.got.as_str()),
            ("peer_event_broadcast_capacity", "0")
        );
        assert_eq!(
            refused(|c| c.verifier.threads = 0).field,
            "verifier.threads"
        );
        assert_eq!(
            refused(|c| c.grpc.max_concurrent_fetches_per_peer = 0).field,
            "grpc.max_concurrent_fetches_per_peer"
        );
        assert_eq!(
            refused(|c| c.prune.retention = Retention::Commits(0)).field,
            "prune.retention"
        );
        // Settings bounded by others.
        let e = refused(|c| c.grpc.max_inbound_per_ip = c.grpc.max_inbound_per_prefix + 1);
        assert_eq!(e.field, "grpc.max_inbound_per_ip");
        let e = refused(|c| c.state_sync.commit_sync_batch_size = 1_001);
        assert_eq!(
            (e.field, e.allowed),
            (
                "state_sync.commit_sync_batch_size",
                "at most verifier.limits.max_commits_per_batch"
            )
        );
        let e = refused(|c| c.verifier.limits.max_block_bytes = usize::MAX);
        assert_eq!(e.field, "verifier.limits.max_block_bytes");
        let e = refused(|c| {
            c.discovery.target_concurrent_connections = c.connections.max_connections + 1
        });
        assert_eq!(
            (e.field, e.allowed),
            (
                "discovery.target_concurrent_connections",
                "less than connections.max_connections"
            )
        );
        let e =
            refused(|c| c.discovery.target_concurrent_connections = c.connections.max_connections);
        assert_eq!(e.field, "discovery.target_concurrent_connections");
        let mut config = P2pConfig::default();
        config.discovery.target_concurrent_connections = config.connections.max_connections - 1;
        assert_eq!(config.check(), Ok(()));
        let e = refused(|c| c.discovery.dial_backoff_ms = c.discovery.max_dial_backoff_ms + 1);
        assert_eq!(e.field, "discovery.dial_backoff_ms");
        let e = refused(|c| {
            let mut archive = crate::archive::Config::new("/tmp/archive");
            archive.min_retry = archive.max_retry + Duration::from_secs(1);
            c.archive = Some(archive);
        });
        assert_eq!(e.field, "archive.min_retry");
    }

    #[test]
    fn addresses_peers_refuse_are_refused() {
        let e = refused(|c| c.external_addresses = vec!["node.example:7000".into()]);
        assert_eq!(
            (e.field, e.got.as_str()),
            ("external_addresses", "node.example:7000")
        );
        let e = refused(|c| {
            c.external_addresses = (1..=5).map(|i| format!("192.0.2.{i}:7000")).collect()
        });
        assert_eq!(e.got, "5 addresses");
        // Spellings of one address count once.
        let config = P2pConfig {
            external_addresses: vec![
                "[2001:db8::1]:7000".into(),
                "[2001:DB8:0::1]:7000".into(),
                "192.0.2.1:7000".into(),
                "192.0.2.2:7000".into(),
                "192.0.2.3:7000".into(),
            ],
            ..P2pConfig::default()
        };
        assert_eq!(config.check(), Ok(()));
    }
}
