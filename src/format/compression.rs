//! Compressed cluster codecs: raw deflate with a 4 KiB window (what QEMU calls "zlib") and zstd.
//!
//! Decompression stops once a whole cluster has been produced: the stored length is rounded up
//! to 512-byte sectors, so trailing bytes (possibly the next compressed cluster) are ignored.
//! Input that ends before a whole cluster is produced is an error, never a short read.

use crate::error::{Error, Result};
use crate::format::header::CompressionType;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// Decompresses one cluster from `input` into `out` (exactly one cluster long).
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<()> {
    match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => zstd_decompress(input, out),
    }
}

/// Compresses one cluster. Returns `None` when the result would not be smaller than
/// `data.len() - 1` bytes: such clusters are stored uncompressed.
///
/// Compressor state is kept per thread and reset between clusters: setting up a deflate or
/// zstd context costs more than compressing a small cluster.
pub fn compress(kind: CompressionType, data: &[u8]) -> Result<Option<Vec<u8>>> {
    let limit = data.len().saturating_sub(1);
    // zstd gives up on incompressible input quickly by itself; deflate does not.
    if kind == CompressionType::Deflate && !worth_compressing(kind, data) {
        return Ok(None);
    }
    match kind {
        CompressionType::Deflate => DEFLATE.with(|c| {
            let mut c = c.borrow_mut();
            c.reset();
            // Room for the whole stream (deflate can expand incompressible data a little): a
            // tight output buffer trips an assertion in zlib-rs with tiny clusters.
            let mut out = vec![0u8; data.len() + data.len() / 8 + 256];
            match c.compress(data, &mut out, FlushCompress::Finish) {
                Ok(Status::StreamEnd) if (c.total_out() as usize) < limit => {
                    out.truncate(c.total_out() as usize);
                    Ok(Some(out))
                }
                Ok(_) => Ok(None), // did not fit below the limit
                Err(e) => Err(Error::corrupt(format!("deflate failed: {e}"))),
            }
        }),
        CompressionType::Zstd => ZSTD.with(|c| {
            let mut c = c.borrow_mut();
            let c = match c.as_mut() {
                Some(c) => c,
                None => {
                    let new = zstd::bulk::Compressor::new(0)
                        .map_err(|e| Error::io("creating a zstd compressor", e))?;
                    c.insert(new)
                }
            };
            let mut out = Vec::with_capacity(limit);
            match c.compress_to_buffer(data, &mut out) {
                Ok(n) if n < limit => Ok(Some(out)),
                Ok(_) => Ok(None),
                // The output buffer (limit bytes) was too small: not worth it.
                Err(_) => Ok(None),
            }
        }),
    }
}

thread_local! {
    static DEFLATE: std::cell::RefCell<Compress> =
        std::cell::RefCell::new(Compress::new_with_window_bits(Compression::default(), false, 12));
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether compressing `data` can pay off. Random-looking data (byte entropy close to 8 bits)
/// whose sample does not shrink is stored uncompressed without spending a full compression on
/// it; anything with structure (text, zeros, mixtures, repeated blocks within the window) is
/// compressed as usual.
pub fn worth_compressing(kind: CompressionType, data: &[u8]) -> bool {
    if data.len() < 16 << 10 {
        return true;
    }
    // Byte histogram of four 4 KiB samples spread over the cluster: cheap, and a mixture (some
    // zeros or text anywhere) lowers the entropy enough to go the normal way.
    let mut hist = [0u32; 256];
    let quarter = data.len() / 4;
    for q in 0..4 {
        for &b in &data[q * quarter..q * quarter + 4096] {
            hist[b as usize] += 1;
        }
    }
    let n = 4.0 * 4096.0;
    let entropy: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum();
    if entropy < 7.9 {
        return true;
    }
    // High byte entropy: repeated strings are the only way to compress. Try a sample (which is
    // longer than the deflate window, so a block repeated within the window shows).
    let sample = &data[..8192.min(data.len())];
    let mut c = Compress::new_with_window_bits(Compression::fast(), false, 12);
    let mut out = vec![0u8; sample.len() + sample.len() / 8 + 256];
    let shrunk = matches!(
        c.compress(sample, &mut out, FlushCompress::Finish),
        Ok(Status::StreamEnd)
    ) && (c.total_out() as usize) < sample.len() * 97 / 100;
    let _ = kind;
    shrunk
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<()> {
    let mut d = Decompress::new_with_window_bits(false, 12);
    match d.decompress(input, out, FlushDecompress::Finish) {
        Ok(_) if d.total_out() as usize == out.len() => Ok(()),
        Ok(_) => Err(Error::corrupt(format!(
            "compressed cluster decompresses to {} bytes instead of {}",
            d.total_out(),
            out.len()
        ))),
        Err(e) => Err(Error::corrupt(format!("invalid deflate data: {e}"))),
    }
}

fn zstd_decompress(input: &[u8], out: &mut [u8]) -> Result<()> {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let mut dec = Decoder::new().map_err(|e| Error::io("creating zstd decoder", e))?;
    let mut inb = InBuffer::around(input);
    let mut outb = OutBuffer::around(out);
    loop {
        let before = (inb.pos(), outb.pos());
        let hint = dec
            .run(&mut inb, &mut outb)
            .map_err(|e| Error::corrupt(format!("invalid zstd data: {e}")))?;
        if outb.pos() == outb.capacity() {
            return Ok(());
        }
        // A finished frame (hint 0), exhausted input, or no progress: the cluster is short.
        if hint == 0 || inb.pos() == input.len() || before == (inb.pos(), outb.pos()) {
            return Err(Error::corrupt(format!(
                "compressed cluster decompresses to {} bytes instead of {}",
                outb.pos(),
                outb.capacity()
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i / 100) as u8 ^ b'a').collect()
    }

    #[test]
    fn round_trip_both_kinds_with_trailing_garbage() {
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            for bits in [9, 12, 16, 21] {
                let data = sample(1 << bits);
                let mut c = compress(kind, &data).unwrap().expect("compressible");
                c.extend_from_slice(&[0xff; 700]);
                let mut out = vec![0u8; data.len()];
                decompress(kind, &c, &mut out).unwrap();
                assert_eq!(out, data);
            }
        }
    }

    #[test]
    fn repeated_random_blocks_still_compress() {
        // High byte entropy, but a 4 KiB block repeated: deflate's window finds it.
        let block: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let data: Vec<u8> = block.iter().cycle().take(65536).copied().collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let c = compress(kind, &data).unwrap().expect("compressible");
            assert!(c.len() < 16384);
        }
    }

    #[test]
    fn incompressible_data_is_refused() {
        let mut x = 1u64;
        let data: Vec<u8> = (0..65536)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 56) as u8
            })
            .collect();
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            assert!(compress(kind, &data).unwrap().is_none());
        }
    }

    #[test]
    fn truncated_or_garbage_input_is_an_error() {
        for kind in [CompressionType::Deflate, CompressionType::Zstd] {
            let data = sample(65536);
            let c = compress(kind, &data).unwrap().unwrap();
            let mut out = vec![0u8; data.len()];
            assert!(decompress(kind, &c[..c.len() / 2], &mut out).is_err());
            assert!(decompress(kind, &[0x55; 300], &mut out).is_err());
            assert!(decompress(kind, &[], &mut out).is_err());
        }
    }
}
