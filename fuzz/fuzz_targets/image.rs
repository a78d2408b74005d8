//! A whole image from untrusted bytes: open (read-only and read-write), read, write, zero,
//! discard, flush, check, close, over the in-memory storage backend. The last 8 bytes of the
//! input choose the operations; the rest is the image. The body lives in the library
//! (`qimg::fuzzing`) so that tests/hostile.rs replays findings exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    qimg::fuzzing::exercise_image(data);
});
