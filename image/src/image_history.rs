//! An image config's `history`, as BuildKit writes it: one entry per instruction after FROM,
//! `created_by` in BuildKit's words (the planner writes them: `build_plan::HistoryLine`) (`RUN /bin/sh -c … # buildkit`,
//! `COPY a.txt . # buildkit`, `ENV A=b`), `empty_layer` for instructions that change only
//! the config, the comment `buildkit.dockerfile.v0`. `docker history` zips the entries that
//! have layers with the layers, so there is exactly one such entry per layer.

use serde::{Deserialize, Serialize};

/// The comment BuildKit's Dockerfile front end gives its entries.
pub const BUILDKIT_COMMENT: &str = "buildkit.dockerfile.v0";

/// One entry of `history`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct HistoryEntry {
    /// RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The instruction, in BuildKit's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// `buildkit.dockerfile.v0`, or what an imported image says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The instruction made no layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

#[derive(Deserialize)]
struct WithHistory {
    #[serde(default)]
    history: Vec<HistoryEntry>,
}

/// A base image's history from its config document; an image without one (a rootfs
/// import) gets an entry per layer, so every layer has one.
pub fn base_history(config: &[u8], layers: usize) -> Vec<HistoryEntry> {
    let h = serde_json::from_slice::<WithHistory>(config)
        .map(|w| w.history)
        .unwrap_or_default();
    if h.iter().filter(|e| !e.empty_layer).count() == layers {
        return h;
    }
    vec![HistoryEntry::default(); layers]
}

/// Milliseconds since the epoch as RFC 3339 (UTC, millisecond precision).
pub fn rfc3339(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// What one Dockerfile instruction contributes to `history`.
#[derive(Debug, Clone)]
pub enum Contribution {
    /// A filesystem step and its layer.
    Layer {
        /// BuildKit's words.
        created_by: String,
    },
    /// A config-only instruction.
    Config {
        /// BuildKit's words.
        created_by: String,
    },
}

/// Appends a stage's contributions, in Dockerfile order, to its base's history, dated
/// `source_date_epoch` (seconds) when given — as BuildKit dates a reproducible build — and
/// undated otherwise, so that the same build is the same image whenever it runs.
pub fn extend(history: &mut Vec<HistoryEntry>, contributions: &[Contribution], source_date_epoch: Option<u64>) {
    let created = source_date_epoch.map(|s| rfc3339(s * 1000));
    for c in contributions {
        let (created_by, empty_layer) = match c {
            Contribution::Layer { created_by } => (created_by.clone(), false),
            Contribution::Config { created_by } => (created_by.clone(), true),
        };
        history.push(HistoryEntry {
            created: created.clone(),
            created_by: Some(created_by),
            comment: Some(BUILDKIT_COMMENT.into()),
            empty_layer,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_and_entries_follow_buildkit() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_529_419_123), "2026-11-24T14:10:19.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        let mut h = base_history(br#"{"history":[{"created_by":"base"}]}"#, 1);
        extend(
            &mut h,
            &[
                Contribution::Config {
                    created_by: "ENV A=b".into(),
                },
                Contribution::Layer {
                    created_by: "RUN /bin/sh -c echo hi # buildkit".into(),
                },
                Contribution::Config {
                    created_by: "CMD [\"sh\"]".into(),
                },
            ],
            Some(2),
        );
        assert_eq!(h.len(), 4);
        assert!(h[1].empty_layer && !h[2].empty_layer);
        assert_eq!(h[2].created_by.as_deref(), Some("RUN /bin/sh -c echo hi # buildkit"));
        assert_eq!(h[3].created.as_deref(), Some("1970-01-01T00:00:02.000Z"));
        let json = serde_json::to_string(&h[2]).unwrap();
        assert!(
            !json.contains("empty_layer"),
            "false is left out, as Docker leaves it: {json}"
        );
        assert_eq!(
            base_history(b"{}", 2).len(),
            2,
            "an image without history gets one per layer"
        );
    }
}
