//! NBD wire decoders: option headers, NBD_OPT_INFO/GO payloads, metadata context requests and
//! transmission request headers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qimg::nbd::proto::{
    InfoRequest, MetaContextRequest, OptionHeader, Request, OPTION_HEADER_LEN, REQUEST_LEN,
};

fuzz_target!(|data: &[u8]| {
    if let Some(b) = data.get(..OPTION_HEADER_LEN) {
        let mut h = [0u8; OPTION_HEADER_LEN];
        h.copy_from_slice(b);
        let _ = OptionHeader::decode(&h);
    }
    if let Some(b) = data.get(..REQUEST_LEN) {
        let mut h = [0u8; REQUEST_LEN];
        h.copy_from_slice(b);
        let _ = Request::decode(&h);
    }
    let _ = InfoRequest::decode(data);
    let _ = MetaContextRequest::decode(data);
});
