//! Property tests: the front end never panics on any input, and what it accepts it plans
//! deterministically.

use std::collections::BTreeMap;

use lcache_proto::build_plan::{plan, PlanRequest};
use lcache_proto::dockerfile::Dockerfile;
use lcache_proto::platform::Platform;
use lcache_proto::word_expansion::expand_word;
use proptest::prelude::*;

/// Fragments that steer random text into the parser's interesting corners.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("FROM alpine AS b\n".to_string()),
        Just("FROM b\n".to_string()),
        Just("RUN echo $A \\\n".to_string()),
        Just("RUN <<EOF cat <<-'X'\n".to_string()),
        Just("EOF\n".to_string()),
        Just("\tX\n".to_string()),
        Just("COPY --from=b --chmod=7 a* /d/\n".to_string()),
        Just("COPY <<F /f\n".to_string()),
        Just("ENV A=\"x y\" B=${A:-z}\n".to_string()),
        Just("ARG A=${B:+q}\n".to_string()),
        Just("WORKDIR ${A}/..\n".to_string()),
        Just("SHELL [\"sh\", \"-c\"]\n".to_string()),
        Just("ONBUILD RUN x\n".to_string()),
        Just("# escape=`\n".to_string()),
        Just("HEALTHCHECK --interval=1s CMD [\"x\"]\n".to_string()),
        Just("  # comment\n".to_string()),
        Just("\n".to_string()),
        "[ -~\t\\\\$\"'{}<`\n]{0,20}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = Dockerfile::parse("Dockerfile", &text);
    }

    #[test]
    fn dockerfile_like_text_parses_or_errors_with_a_location_and_plans_deterministically(
        parts in proptest::collection::vec(fragment(), 0..14),
    ) {
        let text: String = parts.concat();
        match Dockerfile::parse("Dockerfile", &text) {
            Ok(df) => {
                let args = BTreeMap::new();
                let req = PlanRequest { build_args: &args, target: None, platform: Platform::parse("linux/amd64").unwrap(), bases: &lcache_proto::build_plan::NoBaseImages };
                let a = plan(&df, &req);
                let b = plan(&df, &req);
                prop_assert_eq!(a, b);
            }
            Err(e) => {
                prop_assert!(e.location.line >= 1 && e.location.column >= 1, "{}", e);
                prop_assert!(!e.hint.is_empty());
            }
        }
    }

    #[test]
    fn expansion_never_panics(s in "[a-zA-Z${}:+?\\-'\"\\\\ ]{0,40}") {
        let vars = |n: &str| if n == "A" { Some("v") } else { None };
        let _ = expand_word(&s, '\\', &vars);
    }
}
