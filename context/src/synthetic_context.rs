//! A reproducible large build context for benchmarks: DESIGN.md's 50,000 files / ~200 MB
//! shape, made once and reused while its marker file says it is complete.

use std::path::Path;

/// Files in the synthetic context.
pub const FILES: usize = 50_000;
const DIRS: usize = 500;

/// Makes (or reuses) the context at `root`: `src/dNNN/fNNN.dat`, sizes 0–8 KiB (mean 4 KiB),
/// and a Dockerfile `FROM scratch / COPY src /src / RUN true`. Returns the bytes of content.
pub fn make_synthetic_context(root: &Path) -> std::io::Result<u64> {
    let marker = root.join(".complete");
    let exists = marker.exists();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let buf: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut total = 0u64;
    for d in 0..DIRS {
        let dir = root.join(format!("src/d{d:03}"));
        if !exists {
            std::fs::create_dir_all(&dir)?;
        }
        for f in 0..FILES / DIRS {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let size = (seed % 8192) as usize;
            let tag = format!("{d}/{f}");
            total += (size + tag.len()) as u64;
            if !exists {
                let mut content = buf[..size].to_vec();
                content.extend_from_slice(tag.as_bytes());
                std::fs::write(dir.join(format!("f{f:03}.dat")), content)?;
            }
        }
    }
    if !exists {
        std::fs::write(root.join("Dockerfile"), "FROM scratch\nCOPY src /src\nRUN true\n")?;
        std::fs::write(&marker, "")?;
    }
    Ok(total)
}
