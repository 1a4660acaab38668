//! Content digests as OCI writes them: `sha256:<64 lower-case hex>`.

/// The hex part of a valid `sha256:<64 hex>` digest; `None` for anything else, so that a
/// digest from outside can name a file only once it has passed here.
pub fn sha256_hex(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_lower_case_sha256_of_the_right_length_passes() {
        let ok = format!("sha256:{}", "a".repeat(64));
        assert_eq!(sha256_hex(&ok), Some(&ok[7..]));
        for bad in [
            "sha256:../../etc/passwd".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}/", "a".repeat(63)),
        ] {
            assert_eq!(sha256_hex(&bad), None, "{bad}");
        }
    }
}
