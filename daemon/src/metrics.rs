//! Counters and latency histograms, rendered as Prometheus text at `GET /metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0,
];

/// The routes latency is tracked for.
pub const ROUTES: [&str; 8] = [
    "status",
    "plan",
    "steps_get",
    "steps_put",
    "blobs_get",
    "blobs_put",
    "builds",
    "other",
];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

/// The daemon's metrics.
#[derive(Default)]
pub struct Metrics {
    /// Step lookups that found a record.
    pub hits: AtomicU64,
    /// Step lookups that found none.
    pub misses: AtomicU64,
    /// Blob bytes received.
    pub bytes_in: AtomicU64,
    /// Blob bytes served.
    pub bytes_out: AtomicU64,
    /// Requests answered with a 4xx.
    pub client_errors: AtomicU64,
    /// Requests answered with a 5xx.
    pub server_errors: AtomicU64,
    /// TCP requests refused for a missing, unknown or read-only token.
    pub auth_failures: AtomicU64,
    /// Step records refused because another layer was stored for the key first.
    pub step_conflicts: AtomicU64,
    /// Local misses the upstream answered.
    pub upstream_hits: AtomicU64,
    /// Local misses the upstream did not have either.
    pub upstream_misses: AtomicU64,
    /// Upstream requests that failed (unreachable, refused, corrupt).
    pub upstream_errors: AtomicU64,
    /// Local misses not looked up upstream because it had just failed to answer.
    pub upstream_skipped: AtomicU64,
    /// Step records pushed to the upstream.
    pub upstream_pushed: AtomicU64,
    /// Step records given up on after retries.
    pub upstream_push_failures: AtomicU64,
    /// Step records waiting to be pushed.
    pub upstream_queue: AtomicU64,
    /// Blobs evicted to stay under --max-size.
    pub evicted_blobs: AtomicU64,
    /// Their bytes.
    pub evicted_bytes: AtomicU64,
    latency: [Histogram; ROUTES.len()],
    /// Lookups by the build's scope: (hits, misses).
    scopes: std::sync::Mutex<std::collections::BTreeMap<String, (u64, u64)>>,
}

/// How many scopes get series of their own; lookups in further ones count as `(other)`,
/// so clients cannot grow the metrics without bound.
const SCOPE_SERIES: usize = 256;

impl Metrics {
    /// Counts a lookup in `scope` (`""`: unscoped).
    pub fn count_scope(&self, scope: &str, hit: bool) {
        let mut m = self.scopes.lock().unwrap_or_else(|p| p.into_inner());
        let name = if m.contains_key(scope) || m.len() < SCOPE_SERIES {
            scope
        } else {
            "(other)"
        };
        let e = m.entry(name.to_string()).or_default();
        if hit {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    /// Records one request's latency under `route` (an entry of [`ROUTES`]).
    pub fn observe(&self, route: &str, status: u16, took: Duration) {
        let i = ROUTES.iter().position(|r| *r == route).unwrap_or(ROUTES.len() - 1);
        let h = &self.latency[i];
        let secs = took.as_secs_f64();
        for (b, bound) in h.buckets.iter().zip(BUCKETS) {
            if secs <= bound {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_us.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
        match status {
            400..=499 => self.client_errors.fetch_add(1, Ordering::Relaxed),
            500..=599 => self.server_errors.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        };
        counter(
            &mut out,
            "lcache_step_hits_total",
            "Step lookups that found a record.",
            &self.hits,
        );
        counter(
            &mut out,
            "lcache_step_misses_total",
            "Step lookups that found none.",
            &self.misses,
        );
        counter(
            &mut out,
            "lcache_blob_bytes_received_total",
            "Blob bytes received.",
            &self.bytes_in,
        );
        counter(
            &mut out,
            "lcache_blob_bytes_served_total",
            "Blob bytes served.",
            &self.bytes_out,
        );
        counter(
            &mut out,
            "lcache_http_client_errors_total",
            "Requests answered 4xx.",
            &self.client_errors,
        );
        counter(
            &mut out,
            "lcache_http_server_errors_total",
            "Requests answered 5xx.",
            &self.server_errors,
        );
        for (name, help, v) in [
            (
                "lcache_auth_failures_total",
                "TCP requests refused for a missing, unknown or read-only token.",
                &self.auth_failures,
            ),
            (
                "lcache_step_conflicts_total",
                "Step records refused: another layer was stored for the key first.",
                &self.step_conflicts,
            ),
            (
                "lcache_upstream_hits_total",
                "Local misses the upstream answered.",
                &self.upstream_hits,
            ),
            (
                "lcache_upstream_misses_total",
                "Local misses the upstream did not have.",
                &self.upstream_misses,
            ),
            (
                "lcache_upstream_errors_total",
                "Upstream requests that failed.",
                &self.upstream_errors,
            ),
            (
                "lcache_upstream_skipped_total",
                "Local misses not looked up upstream because it had just failed to answer.",
                &self.upstream_skipped,
            ),
            (
                "lcache_upstream_pushed_total",
                "Step records pushed to the upstream.",
                &self.upstream_pushed,
            ),
            (
                "lcache_upstream_push_failures_total",
                "Step records given up on after retries.",
                &self.upstream_push_failures,
            ),
            (
                "lcache_evicted_blobs_total",
                "Blobs evicted to stay under --max-size.",
                &self.evicted_blobs,
            ),
            (
                "lcache_evicted_bytes_total",
                "Bytes of blobs evicted to stay under --max-size.",
                &self.evicted_bytes,
            ),
        ] {
            counter(&mut out, name, help, v);
        }
        let _ = writeln!(
            out,
            "# HELP lcache_upstream_queue Step records waiting to be pushed to the upstream.\n# TYPE lcache_upstream_queue gauge\nlcache_upstream_queue {}",
            self.upstream_queue.load(Ordering::Relaxed)
        );
        let name = "lcache_scope_lookups_total";
        let _ = writeln!(
            out,
            "# HELP {name} Step lookups by the build's scope (\"\": unscoped).\n# TYPE {name} counter"
        );
        for (scope, (hits, misses)) in self.scopes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "{name}{{scope=\"{scope}\",result=\"hit\"}} {hits}");
            let _ = writeln!(out, "{name}{{scope=\"{scope}\",result=\"miss\"}} {misses}");
        }
        let name = "lcache_request_duration_seconds";
        let _ = writeln!(out, "# HELP {name} Request latency by route.\n# TYPE {name} histogram");
        for (route, h) in ROUTES.iter().zip(&self.latency) {
            for (b, bound) in h.buckets.iter().zip(BUCKETS) {
                let _ = writeln!(
                    out,
                    "{name}_bucket{{route=\"{route}\",le=\"{bound}\"}} {}",
                    b.load(Ordering::Relaxed)
                );
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}");
            let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(
                out,
                "{name}_sum{{route=\"{route}\"}} {sum}\n{name}_count{{route=\"{route}\"}} {count}"
            );
        }
        out
    }
}
