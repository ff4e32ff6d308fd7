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

#[test]
fn share_chunks_hands_each_item_its_own_chunks_and_serial_runs_once() {
    let (mut a, mut b) = (vec![0f32; 10], vec![0f32; 5]);
    let (sa, sb) = (Shared::new(&mut a), Shared::new(&mut b));
    let mut calls = vec![0f32; 1];
    let sc = Shared::new(&mut calls);
    run(|t| {
        // 5 items: item i gets a[2i..2i+2] and b[i..i+1].
        t.share_chunks(5, [(sa, 2), (sb, 1)], |i, [a, b]| {
            a.fill(i as f32);
            b[0] = 10.0 + i as f32;
        });
        t.serial([sc], |[c]| c[0] += 1.0);
    })
    .unwrap();
    assert_eq!(a, [0., 0., 1., 1., 2., 2., 3., 3., 4., 4.]);
    assert_eq!(b, [10., 11., 12., 13., 14.]);
    assert_eq!(calls, [1.0]);
}

#[test]
fn overlapping_buffers_are_refused() {
    let mut a = vec![0f32; 8];
    let sa = Shared::new(&mut a);
    let e = run(|t| t.serial([sa.sub(0..4), sa.sub(2..6)], |_| {})).unwrap_err();
    assert!(e.0.contains("overlap"), "{e}");
    let e = run(|t| t.share_chunks(2, [(sa, 4), (sa.sub(4..8), 2)], |_, _| {})).unwrap_err();
    assert!(e.0.contains("overlap"), "{e}");
}
