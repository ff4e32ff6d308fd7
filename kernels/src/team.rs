//! A team: every thread of the pool runs the same closure in step, with a spinning barrier
//! between dependent phases. Decode uses it for a whole token (one fork/join instead of five
//! per layer): between rayon calls the workers go to sleep and each wake-up costs microseconds
//! in which the memory bus idles.

use crate::{Kernels, MatvecBlocks, Weights};
use std::cell::Cell;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, TryLockError};

/// One team at a time: two teams sharing the pool could each hold a thread the other's
/// barrier waits for.
static ONE_TEAM: Mutex<()> = Mutex::new(());

/// A slice that team threads write in disjoint parts (or one thread at a time, with barriers
/// in between).
#[derive(Clone, Copy)]
pub struct Shared<'a> {
    ptr: *mut f32,
    len: usize,
    _life: PhantomData<&'a mut [f32]>,
}
// SAFETY: the team's callers promise disjoint writes between barriers (see `slice`).
unsafe impl Send for Shared<'_> {}
unsafe impl Sync for Shared<'_> {}

impl<'a> Shared<'a> {
    pub fn new(s: &'a mut [f32]) -> Shared<'a> {
        Shared {
            ptr: s.as_mut_ptr(),
            len: s.len(),
            _life: PhantomData,
        }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Elements `range` as a slice.
    ///
    /// # Safety
    /// Until the next barrier, no other thread may write these elements, nor read them while
    /// this thread writes them.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, range: std::ops::Range<usize>) -> &mut [f32] {
        assert!(range.start <= range.end && range.end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.end - range.start)
    }
    /// The whole slice, to read.
    ///
    /// # Safety
    /// No thread may write it until the next barrier.
    pub unsafe fn get(&self) -> &[f32] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }
    /// Elements `range` as a buffer of their own (a layer's part of a cache, say). Touches
    /// nothing.
    pub fn sub(&self, range: std::ops::Range<usize>) -> Shared<'a> {
        assert!(range.start <= range.end && range.end <= self.len);
        Shared {
            // SAFETY: in bounds (asserted); the pointer is only dereferenced by the accessors.
            ptr: unsafe { self.ptr.add(range.start) },
            len: range.end - range.start,
            _life: PhantomData,
        }
    }

    fn overlaps(&self, other: &Shared<'_>) -> bool {
        let (a0, b0) = (self.ptr as usize, other.ptr as usize);
        let (a1, b1) = (a0 + self.len * 4, b0 + other.len * 4);
        self.len > 0 && other.len > 0 && a0 < b1 && b0 < a1
    }

    /// The whole slice; as [`Shared::slice`].
    ///
    /// # Safety
    /// As [`Shared::slice`].
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn all(&self) -> &mut [f32] {
        self.slice(0..self.len)
    }
}

struct Sync_ {
    arrived: AtomicUsize,
    generation: AtomicUsize,
    /// Work counters of even and odd phases: a phase resets the other's for the next one.
    next: [AtomicUsize; 2],
    /// Set when a thread's job panicked: the others leave their barriers instead of waiting
    /// for it forever.
    poisoned: AtomicBool,
}

/// A team job panicked on some thread; every thread of the team has left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamPanicked(pub String);

impl std::fmt::Display for TeamPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a team job panicked: {}", self.0)
    }
}
impl std::error::Error for TeamPanicked {}

/// The payload a thread unwinds with when it leaves a barrier because another panicked.
struct LeftPoisonedTeam;

/// One thread's view of the team.
pub struct Team<'a> {
    /// This thread's index, 0..n; thread 0 does the serial parts.
    pub id: usize,
    pub n: usize,
    sync: &'a Sync_,
    phase: Cell<usize>,
}

impl Team<'_> {
    /// Wait until every thread of the team got here. Spins (the waits are microseconds), and
    /// yields after a while in case the other thread was descheduled.
    pub fn barrier(&self) {
        if self.n == 1 {
            return;
        }
        let s = self.sync;
        let gen = s.generation.load(Ordering::Acquire);
        if s.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            s.arrived.store(0, Ordering::Relaxed);
            s.generation.store(gen.wrapping_add(1), Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == gen {
            if s.poisoned.load(Ordering::Acquire) {
                resume_unwind(Box::new(LeftPoisonedTeam));
            }
            if spins < 1 << 11 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// The threads share `blocks` work items: `f(b)` runs once for each b in 0..blocks, on
    /// whichever thread takes it first, in increasing order per thread. Ends with a barrier.
    pub fn share(&self, blocks: usize, f: impl Fn(usize)) {
        if self.n == 1 {
            (0..blocks).for_each(f);
            return;
        }
        let p = self.phase.get();
        self.phase.set(p + 1);
        let (this, other) = (&self.sync.next[p % 2], &self.sync.next[(p + 1) % 2]);
        if self.id == 0 {
            // Nobody touches the other counter before the barrier that ends this phase.
            other.store(0, Ordering::Relaxed);
        }
        loop {
            let b = this.fetch_add(1, Ordering::Relaxed);
            if b >= blocks {
                break;
            }
            f(b);
        }
        self.barrier();
    }

    /// `f` on thread 0 alone with every buffer of `bufs` (pairwise disjoint), while the other
    /// threads wait; ends with a barrier. The serial steps of a phase (a norm, a residual add)
    /// go through here, so that no code outside the team touches a shared buffer unguarded.
    pub fn serial<const N: usize>(&self, bufs: [Shared<'_>; N], f: impl FnOnce([&mut [f32]; N])) {
        assert_disjoint(&bufs);
        if self.id == 0 {
            // SAFETY: the buffers are disjoint (asserted) and no other thread runs anything
            // but this barrier until thread 0 is done with them.
            f(bufs.map(|b| unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) }));
        }
        self.barrier();
    }

    /// The threads share `n` items: item `i` gets, exclusively, the `i`-th chunk of `len`
    /// values of each buffer (the last chunk may be shorter); the buffers must be pairwise
    /// disjoint and hold `n` chunks. Ends with a barrier.
    pub fn share_chunks<const N: usize>(
        &self,
        n: usize,
        bufs: [(Shared<'_>, usize); N],
        f: impl Fn(usize, [&mut [f32]; N]),
    ) {
        assert_disjoint(&bufs.map(|b| b.0));
        for (b, len) in &bufs {
            assert!(
                n == 0 || (n - 1) * len < b.len.max(1) && b.len <= n * len,
                "share_chunks: a buffer of {} is not {n} chunks of {len}",
                b.len
            );
        }
        self.share(n, |i| {
            // SAFETY: chunk i of each buffer goes to this item only (`share` runs each i once)
            // and the buffers are disjoint, so no two items touch the same element.
            f(
                i,
                bufs.map(|(b, len)| unsafe {
                    let (s, e) = (i * len, ((i + 1) * len).min(b.len));
                    std::slice::from_raw_parts_mut(b.ptr.add(s), e - s)
                }),
            )
        });
    }

    /// [`Team::matvecs`] with `x` in a shared buffer, which no output may overlap: the phase
    /// only reads it, and the barrier before the phase ended its writes.
    pub fn matvecs_shared(&self, k: &Kernels, jobs: &[(Weights<'_>, Shared<'_>)], x: Shared<'_>) {
        // SAFETY: `matvecs` asserts that no output overlaps x, so nothing in this phase
        // writes it.
        self.matvecs(k, jobs, unsafe { std::slice::from_raw_parts(x.ptr, x.len) })
    }

    /// y_i = W_i x for up to four matrices sharing `x`, the rows shared out in ~256 KiB
    /// blocks (see [`Kernels::matvecs`]); ends with a barrier. Block-format weights: every
    /// thread quantizes `x` itself, into its own reused buffer.
    pub fn matvecs(&self, k: &Kernels, jobs: &[(Weights<'_>, Shared<'_>)], x: &[f32]) {
        let xs = Shared {
            ptr: x.as_ptr() as *mut f32,
            len: x.len(),
            _life: PhantomData,
        };
        for (_, y) in jobs {
            assert!(!y.overlaps(&xs), "Team::matvecs: an output overlaps x");
        }
        // Each thread quantizes x (small) for block formats into its own buffer: no barrier.
        crate::with_acts(|buf| {
            let acts = buf.fill_for(jobs.iter().map(|j| j.0.format()), x);
            // SAFETY: between barriers the team writes these outputs only through the blocks.
            let mb = unsafe {
                MatvecBlocks::new(k, jobs.iter().map(|(w, y)| (*w, y.ptr, y.len)), x, acts)
            };
            // SAFETY: `share` hands each block to one thread.
            self.share(mb.count, |b| unsafe { mb.run(b) });
        })
    }
}

fn assert_disjoint(bufs: &[Shared<'_>]) {
    for (i, a) in bufs.iter().enumerate() {
        for b in &bufs[i + 1..] {
            assert!(!a.overlaps(b), "team: two buffers of one step overlap");
        }
    }
}

/// Run `f` on every thread of the pool as one team (on the calling thread alone if the pool
/// has one thread). `Ok(true)` when all are done; `Ok(false)` without running `f` where a
/// team could deadlock: when called from a pool thread (the caller could hold work a team
/// thread waits for), or while another team runs. If `f` panics on any thread, the others
/// leave their barriers, and the panic comes back as `Err` (the pool stays usable).
pub fn try_run(f: impl Fn(&Team<'_>) + Sync) -> Result<bool, TeamPanicked> {
    let sync = Sync_ {
        arrived: AtomicUsize::new(0),
        generation: AtomicUsize::new(0),
        next: [AtomicUsize::new(0), AtomicUsize::new(0)],
        poisoned: AtomicBool::new(false),
    };
    let n = rayon::current_num_threads();
    let team = |id| Team {
        id,
        n,
        sync: &sync,
        phase: Cell::new(0),
    };
    // Each thread runs its part under catch_unwind; the first real panic's message is kept.
    let first_panic: Mutex<Option<String>> = Mutex::new(None);
    let run_one = |id: usize| {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(&team(id)))) {
            sync.poisoned.store(true, Ordering::Release);
            if !p.is::<LeftPoisonedTeam>() {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic payload".into());
                first_panic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(msg);
            }
        }
    };
    if n <= 1 {
        run_one(0);
    } else {
        if rayon::current_thread_index().is_some() {
            return Ok(false);
        }
        // A poisoned lock only means an earlier team panicked; every thread has left it.
        let _one = match ONE_TEAM.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Ok(false),
        };
        rayon::broadcast(|ctx| run_one(ctx.index()));
    }
    match first_panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(msg) => Err(TeamPanicked(msg)),
        None => Ok(true),
    }
}
