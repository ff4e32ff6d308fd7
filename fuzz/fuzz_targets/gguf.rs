//! Bytes as a GGUF file: the parser must refuse or accept, never panic or over-allocate; an
//! accepted header's tensor ranges must lie inside the input, and a tokenizer built from its
//! metadata must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spinfer::internals::weights::gguf::Gguf;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = Gguf::parse("fuzz.gguf", data) {
        for t in &g.tensors {
            assert!(t.start <= t.end && t.end <= data.len());
        }
        let _ = spinfer::internals::tokenizer::gguf::tokenizer_from_gguf(&g.metadata);
    }
});
