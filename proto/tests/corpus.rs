//! The conformance corpus (`../shared/corpus`: 385 real Dockerfiles and 42 parser fixtures,
//! each with Docker BuildKit's verdict): every file Docker parses must parse, plan and
//! derive keys (every context file it names stubbed as present); every file Docker refuses
//! must be refused with a `file:line` error. `LCACHE_CORPUS` points elsewhere; without the
//! corpus beside the checkout the test says so and checks nothing.

use std::path::{Path, PathBuf};

use lcache_proto::build_plan::{plan, CopyDef, NoBaseImages, PlanRequest};
use lcache_proto::dockerfile::Dockerfile;
use lcache_proto::errors::SelectError;
use lcache_proto::platform::Platform;
use lcache_proto::sources_digest::SourcesDigest;
use lcache_proto::step_keys::{derive_keys, StepRef, StepSources};

/// Every context source exists: its digest is made from its name.
struct Stubbed;

impl StepSources for Stubbed {
    fn context_sources(&mut self, _: StepRef, def: &CopyDef) -> Result<SourcesDigest, SelectError> {
        Ok(SourcesDigest {
            digest: blake3::hash(def.sources.join("\\0").as_bytes()).to_hex().to_string(),
            total: def.sources.len(),
            files: Vec::new(),
            summary: Vec::new(),
            nodes: Vec::new(),
            subtrees: Vec::new(),
        })
    }
    fn stage_sources(&mut self, _: StepRef, _: usize, _: &CopyDef) -> Option<SourcesDigest> {
        None
    }
    fn image_identity(&mut self, _: &str) -> Option<String> {
        None
    }
}

fn corpus() -> Option<PathBuf> {
    let dir = std::env::var_os("LCACHE_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus"));
    dir.join("expected-docker.tsv").is_file().then_some(dir)
}

/// What lcache makes of one file: `Ok` if it parses, plans and derives keys.
fn judge(name: &str, text: &str) -> Result<(), String> {
    let df = Dockerfile::parse(name, text).map_err(|e| e.to_string())?;
    let args = Default::default();
    let p = plan(
        &df,
        &PlanRequest {
            build_args: &args,
            target: None,
            platform: Platform::parse("linux/amd64").expect("platform"),
            bases: &NoBaseImages,
        },
    )
    .map_err(|e| e.to_string())?;
    derive_keys(&p, &mut Stubbed).map_err(|(at, e)| format!("{name}: stage {} step {}: {e}", at.stage, at.step))?;
    Ok(())
}

#[test]
fn lcache_parses_what_docker_parses_and_refuses_what_it_refuses() {
    let Some(dir) = corpus() else {
        eprintln!("corpus not found beside the checkout (../shared/corpus) nor at LCACHE_CORPUS: nothing checked");
        return;
    };
    let mut total = 0;
    let mut agree = 0;
    let mut disagreements = Vec::new();
    for (list, files) in [("expected-docker.tsv", "files"), ("extra/expected-docker.tsv", "extra")] {
        let tsv = std::fs::read_to_string(dir.join(list)).expect("verdicts");
        for row in tsv.lines().skip(1) {
            let mut cols = row.split('\t');
            let (Some(name), Some(verdict)) = (cols.next(), cols.next()) else {
                continue;
            };
            let path = [files, "files", "manual"]
                .iter()
                .map(|d| dir.join(d).join(name))
                .find(|p| p.is_file());
            let Some(path) = path else {
                disagreements.push(format!("{name}: listed but not found"));
                continue;
            };
            let text = String::from_utf8_lossy(&std::fs::read(&path).expect("read")).into_owned();
            total += 1;
            let got = judge(name, &text);
            match (verdict, &got) {
                ("parsed", Ok(())) => agree += 1,
                ("rejected", Err(e)) if e.contains(&format!("{name}:")) => agree += 1,
                ("parsed", Err(e)) => disagreements.push(format!("{name}: Docker parses it, lcache: {e}")),
                ("rejected", Err(e)) => disagreements.push(format!("{name}: refused without file:line: {e}")),
                _ => disagreements.push(format!("{name}: Docker refuses it, lcache accepts it")),
            }
        }
    }
    eprintln!("corpus: lcache agrees with Docker on {agree}/{total}");
    assert!(disagreements.is_empty(), "{}", disagreements.join("\n"));
}
