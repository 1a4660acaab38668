//! Pulls and pushes through the daemon, with the user's Docker credentials for the
//! registry, and the pulls a build needs before it is planned: each base image of a needed
//! stage the daemon lacks (all of them with `--pull`, to re-resolve their tags).

use anyhow::{Context, Result};
use lcache_proto::build_plan::{Base, NoBaseImages};
use lcache_proto::image_reference::registry_of;
use lcache_proto::planned_build::PlannedBuild;
use lcache_proto::wire::{PlanInputs, PullRequest, PullResponse, PushRequest, PushResponse};

use crate::daemon_client::DaemonClient;
use crate::docker_credentials::credentials_for;

/// Pulls `reference` for `platform` into the daemon.
pub fn pull(client: &DaemonClient, reference: &str, platform: &str, insecure: &[String]) -> Result<PullResponse> {
    let credentials = credentials_for(registry_of(reference))?;
    let req = PullRequest {
        reference: reference.to_string(),
        platform: platform.to_string(),
        credentials,
        insecure_registries: insecure.to_vec(),
    };
    client
        .pull_image(&req)
        .with_context(|| format!("cannot pull {reference}"))
}

/// Pushes the daemon's image `image` to `reference`.
pub fn push(client: &DaemonClient, image: &str, reference: &str, insecure: &[String]) -> Result<PushResponse> {
    let credentials = credentials_for(registry_of(reference))?;
    let req = PushRequest {
        image: image.to_string(),
        reference: reference.to_string(),
        credentials,
        insecure_registries: insecure.to_vec(),
    };
    client
        .push_image(&req)
        .with_context(|| format!("cannot push {image} to {reference}"))
}

/// Pulls the base images the build needs that the daemon lacks (every one with
/// `always`); returns a line per pull for the progress display.
pub fn ensure_bases(
    client: &DaemonClient,
    inputs: &PlanInputs,
    always: bool,
    insecure: &[String],
) -> Result<Vec<String>> {
    // A Dockerfile that does not plan is left for the daemon's plan to report.
    let Ok(planned) = PlannedBuild::new(inputs, &NoBaseImages) else {
        return Ok(Vec::new());
    };
    let mut seen = Vec::new();
    let mut notes = Vec::new();
    for stage in planned.plan.needed_stages() {
        let Base::Image { reference } = &stage.base else {
            continue;
        };
        if seen.contains(reference) {
            continue;
        }
        seen.push(reference.clone());
        if !always && client.image(reference)?.is_some() {
            continue;
        }
        let r = pull(client, reference, &stage.platform, insecure).with_context(|| {
            format!(
                "{}:{}: FROM {reference} is not in lcached and could not be pulled (offline? `lcache image import FILE {reference}` adds it from a file)",
                inputs.dockerfile_name, stage.line
            )
        })?;
        notes.push(format!(
            "pulled {} ({}): {} blobs fetched ({} bytes), {} already here",
            r.resolved, r.image.manifest_digest, r.fetched_blobs, r.fetched_bytes, r.reused_blobs
        ));
    }
    Ok(notes)
}
