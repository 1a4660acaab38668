//! `GET /v1/images`, `GET/PUT/DELETE /v1/images/{name}`: image names and what they point
//! to. Names are percent-encoded in the path (`busybox%3Alatest`, `/` as `%2F`).

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use lcache_proto::wire::{normalize_image_name, split_pinned, ImageRecord};

use super::{error, json, now_ms, read_json, Body};
use crate::state::AppState;
use crate::store::{RecordStore, StoreError};

/// Decodes `%XX` escapes; `None` if malformed or not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn name_of(raw: &str) -> Result<String, Response<Body>> {
    match percent_decode(raw) {
        Some(n) if !n.is_empty() => Ok(normalize_image_name(&n)),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            format!("'{raw}' is not an image name"),
            "percent-encode the name, e.g. busybox%3Alatest",
        )),
    }
}

/// What a reference resolves to.
#[derive(Debug)]
pub enum Resolved {
    /// The image.
    Found(ImageRecord),
    /// No image by that name.
    Missing,
    /// The reference pins a digest and the image of that name has another one.
    DigestMismatch {
        /// The manifest digest the stored image has.
        found: String,
    },
}

/// Resolves an image reference. `name@sha256:…` is enforced: it resolves to an image
/// stored under that exact reference or under its name alone, and only if that image's
/// manifest digest is the pinned one.
pub fn resolve(records: &dyn RecordStore, reference: &str) -> Result<Resolved, StoreError> {
    let name = normalize_image_name(reference);
    let Some((base, digest)) = split_pinned(&name) else {
        return Ok(records.get_image(&name)?.map_or(Resolved::Missing, Resolved::Found));
    };
    // Stored under the pinned reference itself: a pull that verified the digest (an
    // index's, whose platform manifest the record holds) or a PUT whose manifest has it.
    if let Some(i) = records.get_image(&name)? {
        return Ok(Resolved::Found(i));
    }
    Ok(match records.get_image(&normalize_image_name(base))? {
        Some(i) if i.manifest_digest == digest => Resolved::Found(i),
        Some(i) => Resolved::DigestMismatch {
            found: i.manifest_digest,
        },
        None => Resolved::Missing,
    })
}

fn not_found(name: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        format!("no image {name}"),
        "import one with `lcache image import FILE NAME`",
    )
}

/// The most images one `GET /v1/images` returns; page on with `?after=LAST_NAME`.
pub const PAGE_LIMIT: usize = 1000;

/// `GET /v1/images[?limit=N][&after=NAME]`: one page, in name order.
pub fn list(state: &AppState, query: Option<&str>) -> Response<Body> {
    let param = |k: &str| {
        query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
    };
    let limit = match param("limit").map(str::parse::<usize>) {
        None => PAGE_LIMIT,
        Some(Ok(n)) => n.clamp(1, PAGE_LIMIT),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "limit is not a number", "write ?limit=100"),
    };
    let Some(after) = param("after").map_or(Some(String::new()), percent_decode) else {
        return error(
            StatusCode::BAD_REQUEST,
            "after is not percent-encoded",
            "write ?after=busybox%3Alatest",
        );
    };
    match state.records.images(&after, limit) {
        Ok(v) => json(StatusCode::OK, &v),
        Err(e) => super::store_failed(&e),
    }
}

/// `GET /v1/images/{name}`.
pub async fn get(state: &AppState, raw: &str) -> Response<Body> {
    let name = match name_of(raw) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match resolve(state.records.as_ref(), &name) {
        Ok(Resolved::Found(i)) => json(StatusCode::OK, &i),
        // A bucket tier may have it: an image another runner built.
        Ok(Resolved::Missing) => match state.upstream.as_ref() {
            Some(u) => match u.fetch_image(&name, state).await {
                Some(i) => json(StatusCode::OK, &i),
                None => not_found(&name),
            },
            None => not_found(&name),
        },
        Ok(Resolved::DigestMismatch { found }) => error(
            StatusCode::CONFLICT,
            format!("{name} pins a digest, but the image lcached has under that name is {found}"),
            "import the image whose manifest has the pinned digest, or fix the digest in the Dockerfile",
        ),
        Err(e) => super::store_failed(&e),
    }
}

/// `PUT /v1/images/{name}`: every blob it names must be stored.
pub async fn put(state: &std::sync::Arc<AppState>, raw: &str, req: Request<Incoming>) -> Response<Body> {
    let name = match name_of(raw) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let mut image: ImageRecord = match read_json(state, req).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    if let Some((_, pinned)) = split_pinned(&name) {
        if pinned != image.manifest_digest {
            return error(
                StatusCode::CONFLICT,
                format!(
                    "{name} pins {pinned}, but the image's manifest is {}",
                    image.manifest_digest
                ),
                "name the image by the digest of its own manifest, or by a tag",
            );
        }
    }
    image.name = name;
    image.created_at_ms = now_ms();
    let blobs = [&image.manifest_digest, &image.config_digest]
        .into_iter()
        .chain(image.layers.iter().map(|l| &l.digest));
    for d in blobs {
        match state.records.get_blob(d) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return error(
                    StatusCode::CONFLICT,
                    format!("blob {d} of image {} is not stored", image.name),
                    "PUT every layer, the config and the manifest to /v1/blobs first",
                )
            }
            Err(e) => return super::store_failed(&e),
        }
    }
    match state.records.put_image(&image).and_then(|_| state.records.flush()) {
        Ok(()) => {
            if let Some(u) = &state.upstream {
                u.push_image(&image, state);
            }
            json(StatusCode::CREATED, &image)
        }
        Err(e) => error(
            StatusCode::INSUFFICIENT_STORAGE,
            e.to_string(),
            "free space on the store's disk",
        ),
    }
}

/// `DELETE /v1/images/{name}`.
pub fn delete(state: &AppState, raw: &str) -> Response<Body> {
    let name = match name_of(raw) {
        Ok(n) => n,
        Err(r) => return r,
    };
    match state.records.remove_image(&name) {
        Ok(true) => json(StatusCode::OK, &serde_json::json!({"removed": name})),
        Ok(false) => not_found(&name),
        Err(e) => super::store_failed(&e),
    }
}
