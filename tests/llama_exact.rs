//! The reference check of tests/llama.rs with bf16 weights computed exactly (widened to f32, f32
//! activations and accumulation) instead of through the kernels' bf16 dot products, so every
//! dtype meets the f32 accumulation-order bound. A separate test binary because the switch is
//! process-wide.

mod llama_common;

/// Both sides compute in f32 from the same stored weights; only the accumulation order and the
/// reference's 6 significant digits differ (measured 3e-12..6e-12), see tests/llama.rs.
const BOUND: f64 = 1e-6;

#[test]
fn every_fixture_matches_transformers_with_f32_activations() {
    spinfer::kernels::set_bf16_dot(false);
    let report = llama_common::check_all_fixtures(|_| BOUND);
    eprintln!(
        "kernels: {}, bf16 dot off\n{}",
        spinfer::kernels::kernels().isa(),
        report.join("\n")
    );
}
