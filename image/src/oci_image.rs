//! OCI image documents: the image config (assembled from a base config and a stage's
//! config changes, as Docker does) and the manifest, serialised deterministically (sorted
//! keys) so equal images have equal digests.

use lcache_proto::build_plan::ConfigChange;
use lcache_proto::wire::LayerRef;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

/// OCI media types.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config media type.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// `sha256:` of bytes.
pub fn sha256_of(b: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(b))
}

/// The runtime part of an image config (`config` in the OCI document), as a JSON object.
pub fn runtime_config(image_config: &str) -> Map<String, Value> {
    serde_json::from_str::<Value>(image_config)
        .ok()
        .and_then(|v| v.get("config").and_then(Value::as_object).cloned())
        .unwrap_or_default()
}

fn set_env(cfg: &mut Map<String, Value>, name: &str, value: &str) {
    let mut env: Vec<String> = cfg
        .get("Env")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let prefix = format!("{name}=");
    match env.iter_mut().find(|e| e.starts_with(&prefix)) {
        Some(e) => *e = format!("{name}={value}"),
        None => env.push(format!("{name}={value}")),
    }
    cfg.insert("Env".into(), json!(env));
}

fn add_to_set(cfg: &mut Map<String, Value>, key: &str, items: &[String]) {
    let entry = cfg.entry(key.to_string()).or_insert_with(|| json!({}));
    if !entry.is_object() {
        *entry = json!({});
    }
    if let Some(o) = entry.as_object_mut() {
        for i in items {
            o.insert(i.clone(), json!({}));
        }
    }
}

/// Applies a stage's config changes to a runtime config, as `docker build` would.
pub fn apply_changes(cfg: &mut Map<String, Value>, changes: &[ConfigChange]) {
    for c in changes {
        match c {
            ConfigChange::Env { name, value } => set_env(cfg, name, value),
            ConfigChange::Cmd { args } => {
                cfg.insert("Cmd".into(), json!(args));
            }
            ConfigChange::Entrypoint { args } => {
                cfg.insert("Entrypoint".into(), json!(args));
                // Docker drops an inherited CMD when the Dockerfile sets ENTRYPOINT.
                cfg.insert("Cmd".into(), Value::Null);
            }
            ConfigChange::Workdir { path } => {
                cfg.insert("WorkingDir".into(), json!(path));
            }
            ConfigChange::User { user } => {
                cfg.insert("User".into(), json!(user));
            }
            ConfigChange::Expose { ports } => add_to_set(cfg, "ExposedPorts", ports),
            ConfigChange::Label { key, value } => {
                let labels = cfg.entry("Labels").or_insert_with(|| json!({}));
                if !labels.is_object() {
                    *labels = json!({});
                }
                if let Some(o) = labels.as_object_mut() {
                    o.insert(key.clone(), json!(value));
                }
            }
            ConfigChange::Volume { paths } => add_to_set(cfg, "Volumes", paths),
            ConfigChange::Stopsignal { signal } => {
                cfg.insert("StopSignal".into(), json!(signal));
            }
            ConfigChange::Healthcheck { test, options } => {
                let mut h = Map::new();
                h.insert("Test".into(), json!(test));
                for (k, v) in options {
                    let key = match k.as_str() {
                        "interval" => "Interval",
                        "timeout" => "Timeout",
                        "start-period" => "StartPeriod",
                        "start-interval" => "StartInterval",
                        _ => "Retries",
                    };
                    h.insert(key.into(), json!(v));
                }
                cfg.insert("Healthcheck".into(), Value::Object(h));
            }
            ConfigChange::Shell { args } => {
                cfg.insert("Shell".into(), json!(args));
            }
            ConfigChange::Onbuild { instruction } => {
                let mut list: Vec<Value> = cfg
                    .get("OnBuild")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                list.push(json!(instruction));
                cfg.insert("OnBuild".into(), Value::Array(list));
            }
        }
    }
}

/// The image config document for `layers` with runtime config `cfg`.
pub fn config_document(platform: &str, cfg: &Map<String, Value>, layers: &[LayerRef]) -> Vec<u8> {
    let mut parts = platform.split('/');
    let os = parts.next().unwrap_or("linux");
    let arch = parts.next().unwrap_or("amd64");
    let doc = json!({
        "architecture": arch,
        "os": os,
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// The manifest document for a config blob and layers.
pub fn manifest_document(config: &[u8], layers: &[LayerRef]) -> Vec<u8> {
    let doc = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": sha256_of(config), "size": config.len()},
        "layers": layers.iter().map(|l| json!({"mediaType": l.media_type, "digest": l.digest, "size": l.size})).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Env of a runtime config as `NAME=value` strings.
pub fn env_of(cfg: &Map<String, Value>) -> Vec<String> {
    cfg.get("Env")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_apply_as_docker_does() {
        let mut cfg = runtime_config(r#"{"config":{"Env":["PATH=/bin"],"Cmd":["sh"]}}"#);
        apply_changes(
            &mut cfg,
            &[
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
            ],
        );
        assert_eq!(env_of(&cfg), ["PATH=/usr/bin:/bin", "A=1"]);
        assert_eq!(cfg["Cmd"], Value::Null, "ENTRYPOINT resets an inherited CMD");
        assert_eq!(cfg["ExposedPorts"], json!({"80/tcp": {}}));
    }

    #[test]
    fn documents_are_deterministic() {
        let cfg = runtime_config("{}");
        let l = vec![LayerRef {
            digest: "sha256:a".into(),
            blake3: String::new(),
            size: 3,
            diff_id: "sha256:b".into(),
            media_type: "m".into(),
        }];
        let c1 = config_document("linux/amd64", &cfg, &l);
        assert_eq!(c1, config_document("linux/amd64", &cfg, &l));
        assert_eq!(manifest_document(&c1, &l), manifest_document(&c1, &l));
    }
}
