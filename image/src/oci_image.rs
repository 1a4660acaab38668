//! OCI image documents: the image config (assembled from a base config and a stage's
//! config changes, as Docker does) and the manifest, serialised deterministically (sorted
//! keys) so equal images have equal digests.

use std::collections::BTreeMap;

use lcache_proto::build_plan::{BaseConfig, ConfigChange};
use lcache_proto::healthcheck::parse_options;
use lcache_proto::wire::LayerRef;
use oci_spec::image::{Descriptor, Digest as OciDigest, ImageIndexBuilder, ImageManifestBuilder, MediaType};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};

/// OCI media types.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// `sha256:` of bytes.
pub fn sha256_of(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// An empty JSON object: the value of each key of `ExposedPorts` and `Volumes`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// A container health check, as Docker stores it (durations in nanoseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["CMD", …]`, `["CMD-SHELL", cmd]`, or `["NONE"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<Vec<String>>,
    /// Time between checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<i64>,
    /// Time a check may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<i64>,
    /// Time to start before checks count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_period: Option<i64>,
    /// Time between checks while starting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_interval: Option<i64>,
    /// Failures before unhealthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<i64>,
}

/// The runtime part of an image config (`config` in the OCI document) with the fields
/// Docker adds to OCI's (`Healthcheck`, `OnBuild`, `Shell`), which is why it is not
/// `oci_spec::image::Config`. Fields a builder does not know (`Hostname`, `Tty`…) are
/// dropped, as BuildKit drops them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RuntimeConfig {
    /// USER.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// EXPOSE (`80/tcp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, Empty>>,
    /// ENV as `NAME=value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// ENTRYPOINT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// CMD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// VOLUME.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, Empty>>,
    /// WORKDIR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// LABEL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// STOPSIGNAL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Windows images' pre-escaped command lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args_escaped: Option<bool>,
    /// HEALTHCHECK.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    /// ONBUILD triggers, as written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    /// SHELL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
}

/// Why an image config document cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the image config is malformed: {0}")]
pub struct ConfigError(#[from] serde_json::Error);

/// The parts of an image config document a builder reads.
#[derive(Debug, Default, Deserialize)]
struct ConfigDocument {
    #[serde(default)]
    config: Option<RuntimeConfig>,
}

impl RuntimeConfig {
    /// The runtime config of an image config document (`{"config": {…}, "rootfs": …}`).
    pub fn of_document(document: &[u8]) -> Result<Self, ConfigError> {
        let d: ConfigDocument = serde_json::from_slice(document)?;
        Ok(d.config.unwrap_or_default())
    }

    /// The config a stage built on this image starts from, as BuildKit makes it: the
    /// default PATH added if the image sets none, and its ONBUILD triggers dropped (the
    /// stage runs them; they are not passed on to the images built from it).
    pub fn for_new_stage(mut self) -> Self {
        let path = self.base_config().env_with_path();
        self.env = Some(path);
        self.on_build = None;
        self
    }

    /// What a stage built on this image starts from.
    pub fn base_config(&self) -> BaseConfig {
        BaseConfig {
            env: self.env().to_vec(),
            user: self.user.clone().unwrap_or_default(),
            workdir: self.working_dir.clone().unwrap_or_default(),
            shell: self.shell.clone().unwrap_or_default(),
            onbuild: self.on_build.clone().unwrap_or_default(),
        }
    }

    /// ENV as `NAME=value` strings.
    pub fn env(&self) -> &[String] {
        self.env.as_deref().unwrap_or_default()
    }

    fn set_env(&mut self, name: &str, value: &str) {
        let env = self.env.get_or_insert_with(Vec::new);
        let prefix = format!("{name}=");
        match env.iter_mut().find(|e| e.starts_with(&prefix)) {
            Some(e) => *e = format!("{name}={value}"),
            None => env.push(format!("{name}={value}")),
        }
    }

    /// Applies a stage's config changes, as `docker build` would.
    pub fn apply(&mut self, changes: &[ConfigChange]) {
        let add = |set: &mut Option<BTreeMap<String, Empty>>, items: &[String]| {
            let set = set.get_or_insert_with(BTreeMap::new);
            for i in items {
                set.insert(i.clone(), Empty {});
            }
        };
        for c in changes {
            match c {
                ConfigChange::Env { name, value } => self.set_env(name, value),
                // BuildKit marks the command lines of CMD and ENTRYPOINT as already escaped.
                // `CMD []` and `ENTRYPOINT []` clear them, as Docker writes them (absent).
                ConfigChange::Cmd { args } => {
                    self.cmd = (!args.is_empty()).then(|| args.clone());
                    self.args_escaped = Some(true);
                }
                ConfigChange::Entrypoint { args } => {
                    self.entrypoint = (!args.is_empty()).then(|| args.clone());
                    // Docker drops an inherited CMD when the Dockerfile sets ENTRYPOINT.
                    self.cmd = None;
                    self.args_escaped = Some(true);
                }
                ConfigChange::Workdir { path } => self.working_dir = Some(path.clone()),
                ConfigChange::User { user } => self.user = Some(user.clone()),
                ConfigChange::Expose { ports } => add(&mut self.exposed_ports, ports),
                ConfigChange::Label { key, value } => {
                    self.labels
                        .get_or_insert_with(BTreeMap::new)
                        .insert(key.clone(), value.clone());
                }
                ConfigChange::Volume { paths } => add(&mut self.volumes, paths),
                ConfigChange::Stopsignal { signal } => self.stop_signal = Some(signal.clone()),
                ConfigChange::Healthcheck { test, options } => {
                    // The planner refused bad options with their line; none reach here.
                    let o = parse_options(options).unwrap_or_default();
                    self.healthcheck = Some(Healthcheck {
                        test: Some(test.clone()),
                        interval: o.interval,
                        timeout: o.timeout,
                        start_period: o.start_period,
                        start_interval: o.start_interval,
                        retries: o.retries,
                    });
                }
                ConfigChange::Shell { args } => self.shell = Some(args.clone()),
                ConfigChange::Onbuild { instruction } => {
                    self.on_build.get_or_insert_with(Vec::new).push(instruction.clone());
                }
            }
        }
    }
}

/// The image config document for `layers` with runtime config `cfg`.
pub fn config_document(
    platform: &str,
    cfg: &RuntimeConfig,
    layers: &[LayerRef],
    history: &[crate::image_history::HistoryEntry],
) -> Vec<u8> {
    let mut parts = platform.split('/');
    let os = parts.next().unwrap_or("linux");
    let arch = parts.next().unwrap_or("amd64");
    let mut doc = json!({
        "architecture": arch,
        "os": os,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    // An image without history (an import) keeps the document it always had.
    if let (false, Some(obj)) = (history.is_empty(), doc.as_object_mut()) {
        obj.insert("history".into(), json!(history));
        if let Some(created) = history.iter().rev().find_map(|h| h.created.clone()) {
            obj.insert("created".into(), json!(created));
        }
    }
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Why an OCI document could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot describe the image: {0} — this is a bug in lcache, please report it")]
pub struct DocumentError(#[from] oci_spec::OciSpecError);

/// Serialises through a JSON value so object keys are sorted: equal images, equal bytes.
fn sorted_json(v: &impl Serialize) -> Result<Vec<u8>, DocumentError> {
    let value = serde_json::to_value(v).map_err(|e| DocumentError(e.into()))?;
    serde_json::to_vec(&value).map_err(|e| DocumentError(e.into()))
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Result<Descriptor, DocumentError> {
    let digest: OciDigest = digest.parse()?;
    Ok(Descriptor::new(MediaType::from(media_type), size, digest))
}

/// The manifest document for a config blob and layers.
pub fn manifest_document(config: &[u8], layers: &[LayerRef]) -> Result<Vec<u8>, DocumentError> {
    let layers = layers
        .iter()
        .map(|l| descriptor(&l.media_type, &l.digest, l.size))
        .collect::<Result<Vec<_>, _>>()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(CONFIG_MEDIA_TYPE, &sha256_of(config), config.len() as u64)?)
        .layers(layers)
        .build()?;
    sorted_json(&manifest)
}

/// An image index naming one manifest, tagged `tag` if given (as `docker save` and
/// BuildKit's OCI exporter write it).
pub fn index_document(manifest_digest: &str, manifest_size: u64, tag: Option<&str>) -> Result<Vec<u8>, DocumentError> {
    let mut m = descriptor(MANIFEST_MEDIA_TYPE, manifest_digest, manifest_size)?;
    if let Some(t) = tag {
        m.set_annotations(Some(
            [
                ("org.opencontainers.image.ref.name".to_string(), t.to_string()),
                ("io.containerd.image.name".to_string(), t.to_string()),
            ]
            .into(),
        ));
    }
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![m])
        .build()?;
    sorted_json(&index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_apply_as_docker_does() {
        let mut cfg = RuntimeConfig::of_document(
            br#"{"config":{"Env":["PATH=/bin"],"Cmd":["sh"],"Hostname":"x","Labels":null}}"#,
        )
        .unwrap();
        cfg.apply(&[
            ConfigChange::Env {
                name: "PATH".into(),
                value: "/usr/bin:/bin".into(),
            },
            ConfigChange::Env {
                name: "A".into(),
                value: "1".into(),
            },
            ConfigChange::Entrypoint {
                args: vec!["/app".into()],
            },
            ConfigChange::Expose {
                ports: vec!["80/tcp".into()],
            },
        ]);
        assert_eq!(cfg.env(), ["PATH=/usr/bin:/bin", "A=1"]);
        assert_eq!(cfg.cmd, None, "ENTRYPOINT resets an inherited CMD");
        assert_eq!(
            serde_json::to_value(&cfg).unwrap(),
            json!({"ArgsEscaped": true, "Env": ["PATH=/usr/bin:/bin", "A=1"], "Entrypoint": ["/app"], "ExposedPorts": {"80/tcp": {}}}),
            "fields BuildKit does not know are dropped; unset ones are absent"
        );
    }

    #[test]
    fn healthchecks_store_durations_in_nanoseconds_as_docker_does() {
        let mut cfg = RuntimeConfig::default();
        cfg.apply(&[ConfigChange::Healthcheck {
            test: vec!["CMD-SHELL".into(), "true".into()],
            options: vec![("interval".into(), "1m30s".into()), ("retries".into(), "3".into())],
        }]);
        assert_eq!(
            serde_json::to_value(&cfg).unwrap(),
            json!({"Healthcheck": {"Test": ["CMD-SHELL", "true"], "Interval": 90_000_000_000i64, "Retries": 3}})
        );
        assert!(RuntimeConfig::of_document(br#"{"config":{"Env":"x"}}"#).is_err());
    }

    #[test]
    fn documents_are_deterministic() {
        let cfg = RuntimeConfig::of_document(b"{}").unwrap();
        let l = vec![LayerRef {
            digest: format!("sha256:{}", "a".repeat(64)),
            blake3: String::new(),
            size: 3,
            diff_id: "sha256:b".into(),
            media_type: crate::layer_diff::LAYER_MEDIA_TYPE.into(),
        }];
        let c1 = config_document("linux/amd64", &cfg, &l, &[]);
        assert_eq!(c1, config_document("linux/amd64", &cfg, &l, &[]));
        let m = manifest_document(&c1, &l).unwrap();
        assert_eq!(m, manifest_document(&c1, &l).unwrap());
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], MANIFEST_MEDIA_TYPE);
        assert_eq!(v["config"]["digest"], sha256_of(&c1));
        assert_eq!(v["layers"][0]["size"], 3);
        assert!(manifest_document(
            &c1,
            &[LayerRef {
                digest: "sha256:short".into(),
                ..l[0].clone()
            }]
        )
        .is_err());
    }
}
