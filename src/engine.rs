//! The Spin-facing engine: registry lookup, model cache, access control, infer and
//! generate_embeddings.

use std::path::PathBuf;

pub struct Engine {
    #[allow(dead_code)]
    registry: PathBuf,
}

impl Engine {
    pub fn new(registry: impl Into<PathBuf>) -> Engine {
        Engine {
            registry: registry.into(),
        }
    }
}
