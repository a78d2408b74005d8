//! Big-endian field access on byte slices. Callers check bounds first (the decoders validate
//! lengths before reading fields); these helpers only exist to keep the decoders readable.

#[inline]
pub fn u16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

#[inline]
pub fn u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_be_bytes(a)
}

#[inline]
pub fn u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

#[inline]
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Decodes a table of big-endian u64 entries (L1, L2, refcount table).
pub fn decode_u64_table(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Encodes a table of u64 entries big-endian into `out` (which must be 8 * len long).
pub fn encode_u64_table(entries: &[u64], out: &mut [u8]) {
    for (chunk, e) in out.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&e.to_be_bytes());
    }
}
