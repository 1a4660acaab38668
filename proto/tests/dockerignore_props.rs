//! Property tests of `.dockerignore` (and `--exclude`) matching: no pattern or path makes it
//! panic, and a plain name always matches itself. `LCACHE_FUZZ_CASES=100000` runs longer.

use lcache_proto::dockerignore::IgnoreMatcher;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("LCACHE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Pattern text steered toward globs, negations, escapes and odd separators.
fn pattern() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just("*"),
            Just("**"),
            Just("?"),
            Just("["),
            Just("]"),
            Just("[!a-z]"),
            Just("\\"),
            Just("/"),
            Just("!"),
            Just("."),
            Just(".."),
            Just("a"),
            Just("b"),
            Just(" "),
            Just("{x,y}"),
            Just("é"),
        ],
        0..8,
    )
    .prop_map(|v| v.concat())
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![Just("a"), Just("b"), Just(".a"), Just("[x]"), Just("é")],
        1..5,
    )
    .prop_map(|v| v.join("/"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn no_pattern_or_path_panics(patterns in prop::collection::vec(pattern(), 0..6), p in path()) {
        if let Ok(m) = IgnoreMatcher::from_patterns(patterns.iter().map(String::as_str)) {
            let _ = m.is_excluded(&p);
            let _ = m.skips_dir(&p);
        }
    }

    #[test]
    fn a_plain_name_excludes_itself_and_its_negation_brings_it_back(p in path()) {
        prop_assume!(!p.contains('['));
        let m = IgnoreMatcher::from_patterns([p.as_str()]).unwrap();
        prop_assert!(m.is_excluded(&p));
        let negated = format!("!{p}");
        let m = IgnoreMatcher::from_patterns([p.as_str(), negated.as_str()]).unwrap();
        prop_assert!(!m.is_excluded(&p));
    }
}
