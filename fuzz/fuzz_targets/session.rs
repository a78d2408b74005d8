//! A whole NBD connection from untrusted bytes: the newstyle handshake (every option), then the
//! request loop (every command, pipelined, with admission control), against a small qcow2 image
//! in memory. The first byte chooses the export's settings; the rest is the client's side of the
//! stream. The body lives in the library (`qimg::fuzzing`) so that tests replay findings exactly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = qimg::fuzzing::exercise_nbd_session(data);
});
