//! A byte stream between two threads of the process: a blob downloading on one thread and
//! read by the pack on another. Where a pipe copies every byte into the kernel and back in
//! 64 KiB turns (a context switch each), this hands over chunks of up to 1 MiB.

use std::io::{self, Read, Write};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};

/// How much the writer gathers before handing it over.
const CHUNK: usize = 1 << 20;

/// How many chunks may wait for the reader.
const WAITING: usize = 8;

/// A connected writer and reader. Dropping the writer ends the stream (the reader sees its
/// end once it has read what was written); dropping the reader makes writes fail, as a
/// closed pipe does.
pub fn byte_channel() -> (ChunkWriter, ChunkReader) {
    let (tx, rx) = sync_channel(WAITING);
    (
        ChunkWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        },
        ChunkReader {
            rx,
            chunk: Vec::new(),
            at: 0,
        },
    )
}

/// The writing end of a [`byte_channel`].
pub struct ChunkWriter {
    tx: SyncSender<Vec<u8>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .send(full)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader stopped reading"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(CHUNK - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

impl Drop for ChunkWriter {
    fn drop(&mut self) {
        // What was written before the end is the reader's; a reader gone has no use for it.
        let _ = self.send();
    }
}

/// The reading end of a [`byte_channel`].
pub struct ChunkReader {
    rx: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.rx.recv() {
                Ok(next) => (self.chunk, self.at) = (next, 0),
                // The writer is gone: the end of the stream.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len() - self.at);
        out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_arrive_in_order_and_whole_then_the_end() {
        let data: Vec<u8> = (0..3_500_000u32).map(|i| (i % 251) as u8).collect();
        let (mut w, mut r) = byte_channel();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            // Writes of every size, some bigger than a chunk.
            let mut at = 0;
            for size in [1usize, 7, 1 << 20, 3, 2 << 20, 65_536].iter().cycle() {
                if at == sent.len() {
                    break;
                }
                let end = (at + size).min(sent.len());
                w.write_all(&sent[at..end]).unwrap();
                at = end;
            }
        });
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        writer.join().unwrap();
        assert_eq!(got, data);
    }

    #[test]
    fn a_reader_that_stops_makes_the_writer_fail() {
        let (mut w, r) = byte_channel();
        drop(r);
        let big = vec![0u8; 3 << 20];
        let e = w.write_all(&big).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
