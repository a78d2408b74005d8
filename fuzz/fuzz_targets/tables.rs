//! Table codecs: L1/L2 entries, refcount entries of every width, the snapshot table, the
//! bitmap directory and compressed clusters. The first bytes choose the geometry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qimg::format::{
    bitmap, compression, snapshot, CompressionType, L1Entry, Mapping, RefcountWidth,
};
use qimg::units::Geometry;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let cluster_bits = 9 + u32::from(data[0]) % 13; // 9..=21
    let g = Geometry::new(cluster_bits);
    let order = u32::from(data[1]) % 7;
    let count = u32::from(u16::from_be_bytes([data[2], data[3]]));
    let rest = &data[4..];

    for (i, chunk) in rest.chunks_exact(8).enumerate() {
        let raw = u64::from_be_bytes(chunk.try_into().unwrap_or([0; 8]));
        if let Ok(m) = Mapping::decode(raw, g) {
            let _ = m.host_cluster();
            let _ = m.is_zero();
            let _ = Mapping::decode(m.encode(g), g);
        }
        let _ = L1Entry(raw).l2_offset(g, i as u64);
    }

    let width = RefcountWidth::new(order);
    let entries = (rest.len() as u64 * 8 / u64::from(width.bits())) as usize;
    let mut block = rest.to_vec();
    for i in 0..entries.min(4096) {
        let v = width.get(&block, i);
        let _ = width.set(&mut block, i, v);
        let _ = width.set(&mut block, i, v.wrapping_add(1));
    }

    let _ = snapshot::decode_table(rest, count, g);
    let _ = bitmap::decode_directory(rest, count, g);

    let out_len = (g.cluster_size() as usize).min(64 << 10);
    let mut out = vec![0u8; out_len];
    let _ = compression::decompress(CompressionType::Deflate, rest, &mut out);
    let _ = compression::decompress(CompressionType::Zstd, rest, &mut out);
});
