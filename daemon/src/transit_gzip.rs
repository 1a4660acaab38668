//! Layers kept as their tar (`lcache build --layer-compression none`) gzipped on the wire
//! between lcacheds: a blob that starts as a tar travels to or from an lcached tier as gzip
//! members, one per chunk read (libdeflate, on the blocking pool), with
//! `Content-Encoding: gzip` and its own length in `x-lcache-length`; the side that takes it
//! inflates it as it streams in, so the store verifies and keeps the tar itself, its
//! digest unchanged. Gzip blobs travel as they are.

use std::io::{self, Write};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use hyper::body::{Body, Frame};

/// The header that carries an encoded blob's own (inflated) length.
pub const LENGTH_HEADER: &str = "x-lcache-length";

/// Whether a blob whose first bytes are `head` is a tar (a tar header's magic at 257).
pub fn is_tar(head: &[u8]) -> bool {
    head.get(257..262) == Some(b"ustar")
}

/// Whether an `Accept-Encoding` or `Content-Encoding` value names gzip.
pub fn names_gzip(value: Option<&hyper::header::HeaderValue>) -> bool {
    value
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().split(';').next() == Some("gzip")))
}

/// `chunks` gzipped, each its own member (a multi-member gzip is one stream).
pub fn gzipped<S>(chunks: S) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static
where
    S: Stream<Item = io::Result<Bytes>> + Send + 'static,
{
    chunks.then(|chunk| async move {
        let chunk = chunk?;
        tokio::task::spawn_blocking(move || {
            let mut member = Vec::with_capacity(chunk.len() / 2 + 64);
            lcache_image::layer_gzip::gzip_member(&chunk, &mut member)?;
            Ok(Bytes::from(member))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))
    })
}

/// How much compressed input is inflated at a time: a gzip member inflates at most ~1,032
/// times, so what one step holds in memory stays bounded whatever a peer sends.
const STEP: usize = 4096;

/// A frame is given out once this much is inflated.
const FRAME: usize = 256 * 1024;

/// What a store that refuses more than `max` bytes gives [`Gunzip`] as its limit: past
/// what one poll can inflate beyond it, so the store's own check (a 413 naming
/// `--max-blob-size`) trips first and this one only bounds a body nothing else counts.
pub fn limit_over(max: u64) -> u64 {
    max.saturating_add((FRAME + STEP * 1100) as u64)
}

/// A body sent gzipped, inflated as it streams: at most `limit` bytes come out (more is an
/// error, as from a gzip bomb), and a stream that ends mid-member is an error.
pub struct Gunzip<B> {
    inner: B,
    decoder: flate2::write::MultiGzDecoder<Vec<u8>>,
    pending: Bytes,
    limit: u64,
    out: u64,
    ended: bool,
}

impl<B> Gunzip<B> {
    /// Inflates `inner`, giving out at most `limit` bytes.
    pub fn new(inner: B, limit: u64) -> Self {
        Self {
            inner,
            decoder: flate2::write::MultiGzDecoder::new(Vec::new()),
            pending: Bytes::new(),
            limit,
            out: 0,
            ended: false,
        }
    }

    /// What is inflated so far, as a frame (`None`: nothing yet), checked against the limit.
    fn take(&mut self) -> Option<io::Result<Frame<Bytes>>> {
        let bytes = std::mem::take(self.decoder.get_mut());
        if bytes.is_empty() {
            return None;
        }
        self.out += bytes.len() as u64;
        if self.out > self.limit {
            return Some(Err(io::Error::other(format!(
                "the gzipped body inflates past {} bytes",
                self.limit
            ))));
        }
        Some(Ok(Frame::data(Bytes::from(bytes))))
    }
}

impl<B> Body for Gunzip<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            // Inflate what came, a step at a time, until a frame's worth is out.
            while !this.pending.is_empty() && this.decoder.get_ref().len() < FRAME {
                let step = this.pending.split_to(this.pending.len().min(STEP));
                if let Err(e) = this.decoder.write_all(&step) {
                    return Poll::Ready(Some(Err(e)));
                }
            }
            if this.decoder.get_ref().len() >= FRAME || (this.pending.is_empty() && this.ended) {
                if this.ended {
                    if let Err(e) = this.decoder.try_finish() {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                if let Some(frame) = this.take() {
                    return Poll::Ready(Some(frame));
                }
                if this.ended {
                    return Poll::Ready(None);
                }
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    // Give out what is inflated while the next bytes are on their way.
                    return match this.take() {
                        Some(frame) => Poll::Ready(Some(frame)),
                        None => Poll::Pending,
                    };
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.pending = data;
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(io::Error::other(e.to_string())))),
                Poll::Ready(None) => this.ended = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn body_of(chunks: Vec<Bytes>) -> StreamBody<impl Stream<Item = Result<Frame<Bytes>, io::Error>> + Unpin> {
        StreamBody::new(futures_util::stream::iter(
            chunks.into_iter().map(|c| Ok(Frame::data(c))),
        ))
    }

    async fn gzip_chunks(data: &[u8], chunk: usize) -> Vec<u8> {
        let chunks: Vec<io::Result<Bytes>> = data.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let out: Vec<io::Result<Bytes>> = gzipped(futures_util::stream::iter(chunks)).collect().await;
        out.into_iter().flat_map(|b| b.unwrap().to_vec()).collect()
    }

    #[tokio::test]
    async fn what_is_gzipped_in_chunks_inflates_back_however_it_is_cut_on_the_wire() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8 ^ (i >> 13) as u8).collect();
        let gz = gzip_chunks(&data, 256 * 1024).await;
        assert!(gz.len() < data.len() / 2);
        for cut in [1, 777, 65536, gz.len()] {
            let wire: Vec<Bytes> = gz.chunks(cut).map(Bytes::copy_from_slice).collect();
            let back = Gunzip::new(body_of(wire), data.len() as u64)
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert!(back == data, "cut every {cut} bytes");
        }
    }

    #[tokio::test]
    async fn a_bomb_a_cut_stream_and_garbage_are_errors() {
        let zeros = vec![0u8; 8 << 20];
        let gz = gzip_chunks(&zeros, 8 << 20).await;
        let bomb = Gunzip::new(body_of(vec![Bytes::from(gz.clone())]), 1 << 20)
            .collect()
            .await;
        assert!(bomb.is_err(), "inflating past the limit");
        let cut = Gunzip::new(body_of(vec![Bytes::copy_from_slice(&gz[..gz.len() - 9])]), 16 << 20)
            .collect()
            .await;
        assert!(cut.is_err(), "a member cut short");
        let garbage = Gunzip::new(body_of(vec![Bytes::from_static(b"not gzip at all")]), 1 << 20)
            .collect()
            .await;
        assert!(garbage.is_err());
    }

    #[test]
    fn encodings_and_tars_are_told() {
        let v = |s: &'static str| hyper::header::HeaderValue::from_static(s);
        assert!(names_gzip(Some(&v("gzip"))));
        assert!(names_gzip(Some(&v("br, gzip;q=0.8"))));
        assert!(!names_gzip(Some(&v("identity"))));
        assert!(!names_gzip(None));
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert!(is_tar(&tar));
        assert!(!is_tar(&[0x1f, 0x8b, 8, 0]));
    }
}
