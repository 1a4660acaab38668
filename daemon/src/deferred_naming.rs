//! Builds that ended before their image was named (`POST /v1/builds/deferred`, `lcache
//! build --name-image later`): the diff_id of a re-run COPY's layer is taken here after
//! `POST /v1/layers` named it, over the whole tar after the change, so it is the one part of
//! an edit that grows with the layer. Such a build hands over what waits for it — the step
//! records, the image's documents, its tags, the build's record — and lcached stores them
//! once the diff_ids are known. The build is kept in the store until then, so a daemon
//! stopped half-way names the image when it starts again; whoever reads images, builds or
//! step records first waits for the builds being named (`settled`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use lcache_image::image_draft::DeferredBuild;
use tokio::sync::watch;

use crate::api::steps::{keep_first, Stored};
use crate::state::AppState;
use crate::store::blob_store::IngestError;
use lcache_proto::wire::is_provisional;

/// The longest a reader waits for builds being named: a diff_id takes about a second per
/// GB of tar, so past this something is wrong and the reader is answered with what is stored.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// How many builds are being named.
pub struct DeferredNaming {
    naming: watch::Sender<usize>,
}

impl Default for DeferredNaming {
    fn default() -> Self {
        Self {
            naming: watch::channel(0).0,
        }
    }
}

/// Counts one build as being named while it lives.
struct Naming<'a>(&'a watch::Sender<usize>);

impl Drop for Naming<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl DeferredNaming {
    /// Waits until no build's image is being named (at most [`SETTLE_LIMIT`]).
    pub async fn settled(&self) {
        let mut rx = self.naming.subscribe();
        let _ = tokio::time::timeout(SETTLE_LIMIT, rx.wait_for(|n| *n == 0)).await;
    }
}

/// Keeps `build` (its id assigned) in the store and starts naming its image; what the
/// build's client is answered with once the store holds it.
pub fn start(state: &Arc<AppState>, build: DeferredBuild) -> Result<(), crate::store::StoreError> {
    state.records.put_deferred(&build)?;
    state.records.put_build(&build.build, state.limits.max_builds)?;
    state.records.flush()?;
    spawn(state, vec![build]);
    Ok(())
}

/// Names the images of the builds kept when the daemon last stopped.
pub fn resume(state: &Arc<AppState>) {
    match state.records.deferred() {
        Ok(builds) => {
            for b in &builds {
                eprintln!(
                    "lcached: naming the image of build {}, which the daemon stopped naming",
                    b.build.id
                );
            }
            // One after the other, oldest first (ids sort by time): a tag two of them move
            // ends on the later build's image.
            spawn(state, builds);
        }
        Err(e) => eprintln!("lcached: cannot read the builds whose images were being named: {e}"),
    }
}

/// Names the images of `builds`, in order, on a task of their own.
fn spawn(state: &Arc<AppState>, builds: Vec<DeferredBuild>) {
    // Counted before the task runs: a reader that comes right after the answer waits.
    state.deferred.naming.send_modify(|n| *n += builds.len());
    let state = Arc::clone(state);
    tokio::spawn(async move {
        for build in builds {
            let counted = Naming(&state.deferred.naming);
            finish(&state, build).await;
            drop(counted);
        }
    });
}

/// Waits for the build's diff_ids, then stores its step records, its image's documents and
/// tags, and its record naming the image; forgets the build either way.
async fn finish(state: &Arc<AppState>, mut build: DeferredBuild) {
    let id = build.build.id.clone();
    // Lets the tests stop the daemon while a build is being named.
    if let Some(ms) = std::env::var("LCACHED_TEST_NAMING_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    match name(state, &mut build).await {
        Ok(manifest) => {
            build.build.image = manifest;
            if let Err(e) = state.records.put_build(&build.build, state.limits.max_builds) {
                eprintln!("lcached: cannot record the image of build {id}: {e}");
            }
        }
        Err(reason) => {
            eprintln!("lcached: the image of build {id} cannot be named: {reason}; the next build of its step packs the layer again");
        }
    }
    if let Err(e) = state.records.remove_deferred(&id).and_then(|_| state.records.flush()) {
        eprintln!("lcached: cannot forget build {id}, whose image is named: {e}");
    }
}

/// Names `build`'s image: its manifest digest.
async fn name(state: &Arc<AppState>, build: &mut DeferredBuild) -> Result<String, String> {
    // Layers answered before they were named (`name_later`) get their digests first.
    let provisional: Vec<String> = build
        .layers
        .iter()
        .filter_map(|l| l.record.layer.as_ref())
        .map(|l| l.digest.clone())
        .filter(|d| is_provisional(d))
        .collect();
    for name in provisional {
        let named = state
            .provisional
            .layer(&*state.records, &name)
            .await
            .map_err(|reason| format!("layer {name} was not stored: {reason}"))?;
        build.resolve_layer(&name, &named.digest);
    }
    for layer in build.layers.clone() {
        let digest = layer
            .record
            .layer
            .as_ref()
            .map(|l| l.digest.clone())
            .unwrap_or_default();
        let open = || state.blobs.open_blob(&digest).ok().flatten();
        let named = match state.layer_naming.wait(&digest, layer.tail.clone(), open).await {
            None => return Err(format!("layer {digest} is no longer stored")),
            Some((Ok(named), _)) => named,
            Some((Err(reason), kept)) => {
                if kept {
                    crate::api::blobs::remove_damaged_layer(state, &digest);
                }
                return Err(format!("layer {digest}: {reason}"));
            }
        };
        // Kept again for the next build of the step, which asks for the tar's states.
        state.layer_naming.keep_known(&digest, &layer.tail, named.clone());
        build.name_layer(layer.at, &named.diff_id);
    }
    for layer in &build.layers {
        let mut rec = layer.record.clone();
        if let Some(l) = rec.layer.as_mut() {
            match state.records.get_blob(&l.digest) {
                Ok(Some(meta)) => {
                    l.blake3 = meta.blake3;
                    l.size = meta.size;
                }
                _ => return Err(format!("layer {} is no longer stored", l.digest)),
            }
        }
        match keep_first(state, &build.scope, rec).await {
            Ok(Ok(Stored::New(_) | Stored::Same(_))) => {}
            // The build used its own layer; the key keeps the first one stored.
            Ok(Ok(Stored::Conflict(_))) => {}
            Ok(Err(e)) => return Err(format!("cannot store step {}: {e}", layer.record.key)),
            Err(e) => return Err(format!("cannot store step {}: {e}", layer.record.key)),
        }
    }
    // As `PUT /v1/images` asks: an image is named only with every layer stored.
    for l in &build.draft.layers {
        if !matches!(state.records.get_blob(&l.digest), Ok(Some(_))) {
            return Err(format!("layer {} of the image is not stored", l.digest));
        }
    }
    let docs = build
        .draft
        .documents()
        .map_err(|e| format!("cannot write the image's documents: {e}"))?;
    let mut image = docs.image;
    for (digest, bytes) in [
        (&image.config_digest, docs.config),
        (&image.manifest_digest, docs.manifest),
    ] {
        store_document(state, digest, bytes).await?;
    }
    // As `PUT /v1/images` asks: a name that pins a digest pins this image's, or nothing is
    // tagged.
    for tag in &build.tags {
        if let Some((_, pinned)) = lcache_proto::wire::split_pinned(tag) {
            if pinned != image.manifest_digest {
                return Err(format!(
                    "{tag} pins {pinned}, but the image's manifest is {}",
                    image.manifest_digest
                ));
            }
        }
    }
    for tag in &build.tags {
        image.name.clone_from(tag);
        image.created_at_ms = crate::api::now_ms();
        state
            .records
            .put_image(&image)
            .map_err(|e| format!("cannot tag the image {tag}: {e}"))?;
        if let Some(u) = &state.upstream {
            u.push_image(&image, state);
        }
    }
    state
        .records
        .flush()
        .map_err(|e| format!("cannot store the image: {e}"))?;
    Ok(image.manifest_digest)
}

/// Stores a config or manifest blob written here.
async fn store_document(state: &AppState, digest: &str, bytes: Vec<u8>) -> Result<(), String> {
    if matches!(state.records.get_blob(digest), Ok(Some(_))) && state.blobs.exists(digest) {
        return Ok(());
    }
    let len = bytes.len() as u64;
    let meta = state
        .blobs
        .ingest(digest, Full::new(Bytes::from(bytes)), Some(len), &state.limits)
        .await
        .map_err(|e: IngestError| format!("cannot store blob {digest}: {e}"))?;
    state
        .records
        .put_blob(&meta)
        .map_err(|e| format!("cannot record blob {digest}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_waits_for_the_builds_being_named() {
        let d = DeferredNaming::default();
        d.settled().await;
        d.naming.send_modify(|n| *n += 1);
        let naming = Naming(&d.naming);
        let waited = tokio::time::timeout(Duration::from_millis(50), d.settled()).await;
        assert!(waited.is_err(), "a reader went on while a build was being named");
        drop(naming);
        tokio::time::timeout(Duration::from_secs(5), d.settled())
            .await
            .expect("a reader waited after the build was named");
    }
}
