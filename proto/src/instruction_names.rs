//! The Dockerfile instruction names and the "did you mean" suggestion for a misspelt one.

/// Every instruction of the Dockerfile reference, in upper case.
pub const INSTRUCTIONS: &[&str] = &[
    "ADD",
    "ARG",
    "CMD",
    "COPY",
    "ENTRYPOINT",
    "ENV",
    "EXPOSE",
    "FROM",
    "HEALTHCHECK",
    "LABEL",
    "MAINTAINER",
    "ONBUILD",
    "RUN",
    "SHELL",
    "STOPSIGNAL",
    "USER",
    "VOLUME",
    "WORKDIR",
];

/// The instruction nearest to `word` by edit distance, if any is close enough to be a typo.
pub fn suggest_instruction(word: &str) -> Option<&'static str> {
    let word = word.to_ascii_uppercase();
    INSTRUCTIONS
        .iter()
        .map(|i| (edit_distance(&word, i), *i))
        .filter(|(d, i)| *d <= (i.len() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, i)| i)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_get_the_nearest_instruction() {
        assert_eq!(suggest_instruction("COPPY"), Some("COPY"));
        assert_eq!(suggest_instruction("workdri"), Some("WORKDIR"));
        assert_eq!(suggest_instruction("ENTRYPIONT"), Some("ENTRYPOINT"));
        assert_eq!(suggest_instruction("XYZZYQ"), None);
    }
}
