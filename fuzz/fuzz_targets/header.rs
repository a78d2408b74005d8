//! Header and header extensions on arbitrary bytes; whatever decodes must encode again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qimg::format::Header;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data) {
        let _ = h.geometry();
        let _ = h.backing_format();
        let _ = h.bitmaps();
        let _ = h.feature_table();
        if let Ok(bytes) = h.encode() {
            // What we wrote must read back.
            let _ = Header::decode(&bytes);
        }
    }
});
