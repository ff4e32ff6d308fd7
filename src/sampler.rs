//! Token sampling with Spin's semantics: repeat penalty, temperature, top-k, top-p, seeded RNG.
