//! all-MiniLM-L6-v2 throughput: sentences/s at batch 1 and batch 32 (8-20 word sentences),
//! beside this machine's f32 FMA peak measured in the same run.
//!
//! `fixtures/fetch-minilm.sh && cargo bench --bench embed`
//! Criterion's "elem/s" column is sentences/s. A plain timing pass first prints sentences/s,
//! the GFLOP/s that implies, and its fraction of the measured peak.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use spinfer::internals::bert::BertModel;
use spinfer::internals::kernels::probe;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SENTENCES: [&str; 32] = [
    "A man is eating food while sitting on a bench in the park.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Serverless functions start in milliseconds and scale down to zero when idle.",
    "Can you recommend a good Italian restaurant near the train station tonight?",
    "The committee postponed its decision on the new budget until next month.",
    "Machine learning models need careful evaluation before they are deployed.",
    "She forgot her umbrella, so she got soaked walking home from work.",
    "Our quarterly revenue grew by twelve percent compared to last year.",
    "The museum opens a new exhibition of modern sculpture this weekend.",
    "Please restart the server after applying the latest security patch.",
    "Children were playing football in the street until it got dark.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Heavy rain is expected across the northern region on Thursday evening.",
    "He practiced the piano every morning before going to school.",
    "The new smartphone has a larger battery and a brighter display.",
    "Scientists discovered a new species of frog in the rainforest last spring.",
    "Traffic on the highway was slow because of an accident near the exit.",
    "The library extended its opening hours during the exam period for students.",
    "Remember to water the plants while I am away on holiday next week.",
    "The team celebrated their victory with a dinner at the local pub.",
    "Electric cars are becoming cheaper as battery technology keeps improving.",
    "The author signed copies of her latest novel at the bookstore downtown.",
    "A gentle breeze carried the smell of fresh bread from the bakery.",
    "The airline cancelled several flights because of the approaching storm.",
    "Students must submit their essays online before midnight on Friday.",
    "The old bridge will be closed for repairs during the summer months.",
    "My grandmother tells wonderful stories about growing up on a farm.",
    "The startup raised funding to expand its engineering team in Berlin.",
    "Doctors recommend at least thirty minutes of exercise most days of the week.",
    "The orchestra performed a symphony by Beethoven to a full concert hall.",
    "Customers can return unused items within thirty days for a full refund.",
    "Volunteers cleaned up the beach and collected several bags of plastic waste.",
];

fn model() -> BertModel {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/real/registry/all-minilm-l6-v2");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run fixtures/fetch-minilm.sh first",
        dir.display()
    );
    BertModel::load(&dir).expect("load all-minilm-l6-v2")
}

/// FLOPs of one forward over sequences of these lengths (dense layers + attention).
fn flops(m: &BertModel, lens: &[usize]) -> f64 {
    let c = m.config();
    let (h, i, l) = (
        c.hidden_size as f64,
        c.intermediate_size as f64,
        c.num_hidden_layers as f64,
    );
    lens.iter()
        .map(|&t| {
            let t = t as f64;
            l * (2.0 * t * (4.0 * h * h + 2.0 * h * i) + 4.0 * t * t * h)
        })
        .sum()
}

/// Plain timing beside the FMA peak, printed once before criterion's own runs.
fn report(m: &BertModel) {
    let threads = rayon::current_num_threads();
    let peak = probe::measure_fma_peak_gflops(threads);
    let lens: Vec<usize> = SENTENCES
        .iter()
        .map(|s| m.tokenize(s).unwrap().len())
        .collect();
    let work = flops(m, &lens);
    let tokens: usize = lens.iter().sum();
    println!(
        "embed: {} sentences, {tokens} tokens ({:.1} per sentence), {threads} threads, isa {}, f32 FMA peak {peak:.0} GFLOP/s",
        SENTENCES.len(),
        tokens as f64 / SENTENCES.len() as f64,
        spinfer::internals::kernels::kernels().isa()
    );
    let time = |name: &str, f: &mut dyn FnMut()| {
        f(); // warm
        let reps = 5;
        let (t, c0) = (Instant::now(), cpu_seconds());
        for _ in 0..reps {
            f();
        }
        let secs = t.elapsed().as_secs_f64() / reps as f64;
        let gflops = work / secs / 1e9;
        // On a shared machine wall time undercounts; CPU time says how busy we kept the cores.
        let cpu = match (c0, cpu_seconds()) {
            (Some(a), Some(b)) => format!(
                ", {:.2} of {threads} cores busy",
                (b - a) / reps as f64 / secs
            ),
            _ => String::new(),
        };
        println!(
            "embed: {name}: {:.0} sentences/s, {gflops:.1} GFLOP/s = {:.0}% of the FMA peak{cpu}",
            SENTENCES.len() as f64 / secs,
            100.0 * gflops / peak
        );
    };
    time("batch 1", &mut || {
        for s in SENTENCES {
            black_box(m.embed(&[s]).unwrap());
        }
    });
    time("batch 32", &mut || {
        black_box(m.embed(&SENTENCES).unwrap());
    });
}

/// This process's user + system CPU time (Linux; None elsewhere).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on every Linux we build for
}

fn embed(c: &mut Criterion) {
    let m = model();
    report(&m);
    let mut g = c.benchmark_group("minilm");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    // One iteration embeds all 32 sentences, so elem/s = sentences/s.
    g.throughput(Throughput::Elements(SENTENCES.len() as u64));
    g.bench_function("batch1", |b| {
        b.iter(|| {
            for s in SENTENCES {
                black_box(m.embed(&[black_box(s)]).unwrap());
            }
        })
    });
    g.bench_function("batch32", |b| {
        b.iter(|| black_box(m.embed(black_box(&SENTENCES)).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, embed);
criterion_main!(benches);
