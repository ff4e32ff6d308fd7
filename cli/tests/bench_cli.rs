//! `spinfer bench` through the built binary: it prints every figure issue 7 asks for.

use std::process::Command;

fn bench(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spinfer"))
        .arg("bench")
        .args([
            "--registry",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/registry"),
        ])
        .args(args)
        .output()
        .expect("run spinfer");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn llama_bench_reports_speed_beside_measured_limits() {
    let (ok, out, err) = bench(&[
        "--model",
        "tiny-llama",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
    ]);
    assert!(ok, "bench failed: {err}");
    for needle in [
        "memory read",
        "FMA peak",
        "load:",
        "prefill:",
        "tok/s",
        "GFLOP/s",
        "% of the",
        "decode:",
        "% of measured bandwidth",
        "peak RSS:",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
}

#[test]
fn bench_reads_a_gguf_folder_and_names_the_bandwidth_reader() {
    let (ok, out, err) = bench(&[
        "--model",
        "gguf-q4_0",
        "--prompt-tokens",
        "8",
        "--gen-tokens",
        "2",
        "--readers",
    ]);
    assert!(ok, "bench failed: {err}");
    for needle in ["prefill:", "decode:", "% of measured bandwidth"] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    // The figure's method, then (--readers) one line per reader tried.
    let method = out
        .lines()
        .find(|l| l.contains("(memory read: the best of"))
        .unwrap_or_else(|| panic!("no method line in:\n{out}"));
    assert!(method.contains(" streams"), "{method}");
    let readers = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && l.contains("GB/s"))
        .count();
    assert!(
        method.contains(&format!("the best of {readers} readers")),
        "{readers} reader lines, method: {method}\n{out}"
    );
}

#[test]
fn embedding_bench_reports_batches_1_and_32() {
    let (ok, out, err) = bench(&["--model", "tiny-bert"]);
    assert!(ok, "bench failed: {err}");
    assert!(
        out.contains("batch  1:") && out.contains("batch 32:"),
        "{out}"
    );
    assert!(out.contains("sentences/s"), "{out}");
}

#[test]
fn bench_of_a_missing_model_is_the_spin_error() {
    let (ok, _, err) = bench(&["--model", "nope"]);
    assert!(!ok);
    assert!(
        err.contains("invalid-input: no model directory found in registry for model 'nope'"),
        "{err}"
    );
    let (ok, _, err) = bench(&["--model", "../llama"]);
    assert!(!ok);
    assert!(err.contains("invalid-input"), "{err}");
}
