//! The bf16 dot path's default is a fixed rule (`bf16_dot_choice`), not a timing: the same on
//! every call and in every process on one machine, and `SPINFER_BF16_DOT` overrides it through
//! `Policy::from_env`.

use spinfer_kernels::{bf16_dot_choice, bf16_dot_rule, kernels, CpuVendor, Policy};
use std::process::Command;

#[test]
fn rule_table() {
    use CpuVendor::*;
    // Default: AVX-512 BF16 on AMD only.
    assert!(bf16_dot_choice(None, true, Amd));
    assert!(!bf16_dot_choice(None, true, Intel));
    assert!(!bf16_dot_choice(None, true, Other));
    assert!(!bf16_dot_choice(None, false, Amd));
    // The environment decides either way, whatever the CPU.
    for v in [Amd, Intel, Other] {
        for has in [false, true] {
            for on in ["1", "on", "true"] {
                assert!(bf16_dot_choice(Some(on), has, v));
            }
            for off in ["0", "off", "false"] {
                assert!(!bf16_dot_choice(Some(off), has, v));
            }
            // Unknown values are ignored.
            assert_eq!(
                bf16_dot_choice(Some("maybe"), has, v),
                bf16_dot_choice(None, has, v)
            );
        }
    }
}

#[test]
fn same_answer_every_call() {
    if std::env::var_os("SPINFER_BF16_DOT").is_some() {
        return; // the child runs below set it; this test is about the default
    }
    let first = bf16_dot_rule();
    // A timing probe would flip now and then on a busy machine; the rule cannot.
    for _ in 0..200 {
        assert_eq!(bf16_dot_rule(), first);
        assert_eq!(Policy::from_env().bf16_dot, first);
    }
    let has = kernels().has_bf16_dot();
    assert_eq!(
        first,
        bf16_dot_choice(None, has, CpuVendor::detect()),
        "the rule with no environment"
    );
    if !has {
        assert!(
            !first,
            "no bf16 dot instructions, so it cannot be on by default"
        );
    }
}

/// Runs in a child process started by `env_override` with `SPINFER_BF16_DOT` set (the process
/// default is read once, so each setting needs its own process).
#[test]
fn env_child() {
    let Ok(v) = std::env::var("SPINFER_POLICY_TEST_EXPECT") else {
        return; // not started by env_override
    };
    assert_eq!(Policy::from_env().bf16_dot, v == "on");
    assert_eq!(spinfer_kernels::bf16_dot_enabled(), v == "on");
}

#[test]
fn env_override() {
    let exe = std::env::current_exe().expect("test binary path");
    for (val, expect) in [("1", "on"), ("on", "on"), ("0", "off"), ("false", "off")] {
        let out = Command::new(&exe)
            .args(["--exact", "env_child", "--nocapture"])
            .env("SPINFER_BF16_DOT", val)
            .env("SPINFER_POLICY_TEST_EXPECT", expect)
            .output()
            .expect("run the test binary");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "SPINFER_BF16_DOT={val}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
