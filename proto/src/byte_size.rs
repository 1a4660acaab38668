//! Sizes as people write them on a command line or in the environment: `123` (bytes),
//! `500M`, `20G`, `1.5GiB`, `2t` (powers of 1024; a trailing `B` or `iB` is allowed).

/// The bytes `s` says, or `None` if it is not a size (or one too large for a u64).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let shift = match unit
        .trim()
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1 << shift);
    }
    let n: f64 = num.parse().ok().filter(|n: &f64| n.is_finite())?;
    let bytes = n * (1u64 << shift) as f64;
    (bytes < u64::MAX as f64).then_some(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them_and_nothing_else_does() {
        assert_eq!(parse_size("123"), Some(123));
        assert_eq!(parse_size("500M"), Some(500 << 20));
        assert_eq!(parse_size(" 64G "), Some(64 << 30));
        assert_eq!(parse_size("512 MB"), Some(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("2t"), Some(2 << 40));
        for bad in ["lots", "-1G", "5X", "", "G", "1.2.3M", "99999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
