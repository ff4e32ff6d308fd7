//! The team of threads decode runs on: a job that panics on one thread must not leave the
//! others spinning at a barrier, must come back as an error, and must leave the pool usable.

use spinfer_kernels::team::{self, Shared, Team, TeamPanicked};

/// `try_run`, retried while another test's team holds the one-team lock.
fn run(f: impl Fn(&Team<'_>) + Sync) -> Result<(), TeamPanicked> {
    loop {
        match team::try_run(&f) {
            Ok(true) => return Ok(()),
            Ok(false) => std::thread::yield_now(),
            Err(e) => return Err(e),
        }
    }
}

#[test]
fn a_panicking_job_is_an_error_and_the_next_team_runs() {
    for panicking in 0..rayon::current_num_threads() {
        // The panicking thread leaves before the first barrier; the others wait there.
        let r = run(|t| {
            if t.id == panicking {
                panic!("job {} failed", t.id);
            }
            t.barrier();
            t.barrier();
        });
        let e = r.expect_err("the panic must come back as an error");
        assert!(e.0.contains(&format!("job {panicking} failed")), "{e}");
    }

    // The pool and the one-team lock survive: a real job still runs, and every thread takes
    // its share of the work.
    let mut out = vec![0f32; 64];
    let shared = Shared::new(&mut out);
    let ran = run(|t| {
        // SAFETY: `share` hands each index to exactly one thread.
        t.share(64, |i| unsafe {
            shared.slice(i..i + 1)[0] = i as f32 + 1.0
        });
    });
    assert_eq!(ran, Ok(()));
    assert!(out.iter().enumerate().all(|(i, &v)| v == i as f32 + 1.0));
}

#[test]
fn a_panic_inside_a_shared_phase_is_an_error() {
    let r = run(|t| {
        t.share(100, |i| {
            if i == 37 {
                panic!("block 37");
            }
        });
        t.barrier();
    });
    assert!(r.unwrap_err().0.contains("block 37"));
}
