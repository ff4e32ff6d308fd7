//! The bandwidth probe's report is consistent: it tries every reader on every buffer, its
//! figure is the best reader's, and it names that reader. (How fast is for `spinfer bench`.)

use spinfer_kernels::probe::measure_bandwidth_with;

#[test]
fn reports_best_reader_and_its_method() {
    // 8 MiB buffers, one pass each: enough to exercise every reader, not to measure.
    let b = measure_bandwidth_with(8 << 20, 1);
    // 4 readers x {pool, pinned} per buffer; the heap buffer always, the mapping where the OS
    // gives one (pinning is skipped only where the allowed CPUs are unknown).
    assert!(
        [4, 8, 16].contains(&b.tried.len()),
        "{} readers: {:?}",
        b.tried.len(),
        b.tried
    );
    assert!(b.tried.iter().any(|t| t.0.contains("heap")));
    if cfg!(target_os = "linux") {
        assert_eq!(b.tried.len(), 16, "linux: mmap + pinned readers too");
        assert!(b.tried.iter().any(|t| t.0.contains("2 MiB pages")));
        assert!(b.tried.iter().any(|t| t.0.contains("pinned")));
    }
    assert!(b.tried.iter().all(|t| t.1.is_finite() && t.1 > 0.0));
    let best = b.tried.iter().map(|t| t.1).fold(0f64, f64::max);
    assert_eq!(b.gbs, best);
    assert!(b.tried.iter().any(|t| t.0 == b.method && t.1 == b.gbs));
}
