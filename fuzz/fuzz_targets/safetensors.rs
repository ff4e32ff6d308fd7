//! Bytes as a safetensors file, through the same checks WeightStore::open_files makes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = spinfer::internals::weights::check_safetensors(data);
});
