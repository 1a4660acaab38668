//! A step's cache key: BLAKE3 over the versioned encoding of its key inputs (scheme version,
//! platform, parent state, instruction kind and named fields), as `docs/cache-keys.md` says.

use serde::{Deserialize, Serialize};

use crate::build_plan::{CopyDef, CopyFrom, RunDef, StepDef};
use crate::key_encoding::{hex, Encoder};
use crate::sources_digest::inline_digest;

/// Bumped whenever anything that goes into a key changes meaning or encoding.
pub const KEY_SCHEME_VERSION: u32 = 1;

/// Everything a key is made of, in the order it is encoded: also what `explain` compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    /// The target platform (`linux/amd64`).
    pub platform: String,
    /// The parent filesystem state: the previous step's key, `scratch`, `image:REF` or a
    /// manifest digest.
    pub parent: String,
    /// `RUN`, `COPY`, `ADD` or `WORKDIR`.
    pub kind: String,
    /// Named fields, in the fixed order of the kind.
    pub fields: Vec<KeyField>,
}

/// One named field of a key's inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyField {
    /// The field's name (`argv`, `env`, `sources_digest`…).
    pub name: String,
    /// Its values, in order.
    pub values: Vec<String>,
}

impl KeyInputs {
    /// The exact bytes the key is the BLAKE3 of.
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Encoder::new();
        e.str("lcache-key")
            .u32(KEY_SCHEME_VERSION)
            .str(&self.platform)
            .str(&self.parent)
            .str(&self.kind);
        e.u32(self.fields.len() as u32);
        for f in &self.fields {
            e.str(&f.name).list(&f.values);
        }
        e.as_bytes().to_vec()
    }

    /// The key, as 64 lower-case hex digits.
    pub fn key(&self) -> String {
        hex(blake3::hash(&self.encode()).as_bytes())
    }

    /// The sources digest a COPY/ADD key was made from, if this is one.
    pub fn sources_digest(&self) -> Option<&str> {
        self.fields
            .iter()
            .find(|f| f.name == "sources_digest")
            .and_then(|f| f.values.first())
            .map(String::as_str)
    }

    /// Whether `other` is the same step on the same parent, its sources digest aside: a
    /// re-run COPY may then be built from its earlier layer and the sources' changes.
    pub fn differs_only_in_sources(&self, other: &KeyInputs) -> bool {
        let rest = |k: &KeyInputs| {
            k.fields
                .iter()
                .filter(|f| f.name != "sources_digest")
                .cloned()
                .collect::<Vec<_>>()
        };
        self.platform == other.platform
            && self.parent == other.parent
            && self.kind == other.kind
            && rest(self) == rest(other)
    }

    /// A field's values, if present.
    pub fn field(&self, name: &str) -> Option<&[String]> {
        self.fields.iter().find(|f| f.name == name).map(|f| f.values.as_slice())
    }
}

fn one(v: impl Into<String>) -> Vec<String> {
    vec![v.into()]
}

fn flag(b: bool) -> Vec<String> {
    one(if b { "true" } else { "false" })
}

fn run_fields(r: &RunDef, sources_digest: &str) -> Vec<(String, Vec<String>)> {
    let heredocs = r
        .heredocs
        .iter()
        .flat_map(|h| {
            [
                h.name.clone(),
                if h.expand { "expand".into() } else { "literal".into() },
                h.content.clone(),
            ]
        })
        .collect();
    vec![
        ("argv".into(), r.argv.clone()),
        ("heredocs".into(), heredocs),
        ("env".into(), r.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        ("workdir".into(), one(&r.workdir)),
        ("user".into(), one(&r.user)),
        ("mounts".into(), r.mounts.clone()),
        ("network".into(), one(&r.network)),
        ("security".into(), one(&r.security)),
    ]
    .into_iter()
    // Only a RUN with bind mounts reads files the key must follow; others keep their keys.
    .chain((!r.binds.is_empty()).then(|| ("sources_digest".into(), one(sources_digest))))
    .collect()
}

fn copy_fields(c: &CopyDef, sources_digest: &str) -> Vec<(String, Vec<String>)> {
    let from = match &c.from {
        CopyFrom::Context => "context".to_string(),
        CopyFrom::Stage { .. } => "stage".to_string(),
        CopyFrom::Image { reference } => format!("image:{reference}"),
    };
    let mut f = vec![
        ("from".into(), one(from)),
        ("sources".into(), c.sources.clone()),
        ("sources_digest".into(), one(sources_digest)),
        (
            "inline".into(),
            c.inline
                .iter()
                .flat_map(|i| [i.name.clone(), inline_digest(&i.name, &i.content)])
                .collect(),
        ),
        ("dest".into(), one(&c.dest)),
        ("chown".into(), one(&c.chown)),
        ("chmod".into(), one(&c.chmod)),
        ("link".into(), flag(c.link)),
        ("exclude".into(), c.excludes.clone()),
        ("parents".into(), flag(c.parents)),
    ];
    if c.add {
        f.push(("checksum".into(), one(&c.checksum)));
        f.push(("keep_git_dir".into(), flag(c.keep_git_dir)));
    }
    f
}

/// The key inputs of a step. `sources_digest` is the Merkle digest of what a COPY/ADD
/// selects (empty when it selects nothing but heredocs); other kinds ignore it.
pub fn key_inputs(def: &StepDef, platform: &str, parent: &str, sources_digest: &str) -> KeyInputs {
    let (kind, fields) = match def {
        StepDef::Run(r) => ("RUN", run_fields(r, sources_digest)),
        StepDef::Copy(c) => (if c.add { "ADD" } else { "COPY" }, copy_fields(c, sources_digest)),
        StepDef::Workdir { path, user } => {
            let mut fields = vec![("path".into(), one(path))];
            // Only when set, so the keys of WORKDIRs before any USER stay as they were.
            if !user.is_empty() {
                fields.push(("user".into(), one(user)));
            }
            ("WORKDIR", fields)
        }
    };
    let fields = fields
        .into_iter()
        .map(|(name, values)| KeyField { name, values })
        .collect();
    KeyInputs {
        platform: platform.to_string(),
        parent: parent.to_string(),
        kind: kind.to_string(),
        fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build_plan::CopyDef;

    fn copy_key(sources_digest: &str, dest: &str, parent: &str) -> String {
        key_inputs(
            &StepDef::Copy(CopyDef::from_context(&["src"], dest)),
            "linux/amd64",
            parent,
            sources_digest,
        )
        .key()
    }

    #[test]
    fn only_a_copy_of_the_same_step_on_the_same_parent_differs_only_in_sources() {
        let copy = |digest: &str, dest: &str, parent: &str| {
            key_inputs(
                &StepDef::Copy(CopyDef::from_context(&["src"], dest)),
                "linux/amd64",
                parent,
                digest,
            )
        };
        let base = copy("d1", "/app/", "p1");
        assert!(base.differs_only_in_sources(&copy("d2", "/app/", "p1")));
        assert!(!base.differs_only_in_sources(&copy("d2", "/app", "p1")), "destination");
        assert!(!base.differs_only_in_sources(&copy("d1", "/app/", "p2")), "parent");
    }

    #[test]
    fn every_input_reaches_the_key() {
        let base = copy_key("d1", "/app/", "p1");
        assert_eq!(copy_key("d1", "/app/", "p1"), base, "deterministic");
        assert_ne!(copy_key("d2", "/app/", "p1"), base, "sources");
        assert_ne!(copy_key("d1", "/app", "p1"), base, "destination, even a trailing slash");
        assert_ne!(copy_key("d1", "/app/", "p2"), base, "parent");
        let other_platform = key_inputs(
            &StepDef::Copy(CopyDef::from_context(&["src"], "/app/")),
            "linux/arm64",
            "p1",
            "d1",
        )
        .key();
        assert_ne!(other_platform, base, "platform");
        let workdir = key_inputs(
            &StepDef::Workdir {
                path: "/app/".into(),
                user: String::new(),
            },
            "linux/amd64",
            "p1",
            "d1",
        )
        .key();
        assert_ne!(workdir, base, "the kind of step");
    }

    #[test]
    fn values_are_length_prefixed_so_moving_a_boundary_changes_the_key() {
        let a = key_inputs(
            &StepDef::Copy(CopyDef::from_context(&["ab", "c"], "/d/")),
            "linux/amd64",
            "p",
            "d",
        );
        let b = key_inputs(
            &StepDef::Copy(CopyDef::from_context(&["a", "bc"], "/d/")),
            "linux/amd64",
            "p",
            "d",
        );
        assert_ne!(a.key(), b.key());
        assert_eq!(a.sources_digest(), Some("d"));
    }
}
