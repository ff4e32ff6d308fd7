//! The `spinfer` binary: argument errors, Spin errors on stderr, streamed and --json output on
//! the fixture models.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn registry() -> PathBuf {
    root().join("fixtures/registry")
}

fn spinfer(args: &[&str]) -> Output {
    spinfer_in(&root(), args, None)
}

fn spinfer_in(cwd: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spinfer"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut si = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            si.write_all(s.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).unwrap()
}

fn has_fixture(model: &str) -> bool {
    let ok = registry()
        .join("llama")
        .join(model)
        .join("config.json")
        .is_file();
    if !ok {
        eprintln!("no {model} fixture yet: skipped");
    }
    ok
}

fn reference(name: &str) -> Value {
    let p = root().join(format!("fixtures/reference/llama/{name}.json"));
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

// ---------------------------------------------------------------- arguments

#[test]
fn help_prints_usage_and_succeeds() {
    for args in [&["--help"][..], &["help"], &["-h"]] {
        let o = spinfer(args);
        assert_eq!(o.status.code(), Some(0));
        assert!(stdout(&o).contains("spinfer infer --model NAME"));
        assert!(stdout(&o).contains("spinfer embed --model NAME"));
    }
    let o = spinfer(&["infer", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("--repeat-penalty-last-n"));
    let o = spinfer(&["embed", "-h"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("Usage: spinfer embed"));
}

#[test]
fn help_lists_each_option_once() {
    for cmd in ["infer", "embed", "bench", "serve"] {
        let o = spinfer(&[cmd, "--help"]);
        assert_eq!(o.status.code(), Some(0), "{cmd} --help");
        let text = stdout(&o);
        let mut seen = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(opt) = line.strip_prefix("  --") {
                let name = opt.split_whitespace().next().unwrap_or_default();
                assert!(
                    seen.insert(name.to_string()),
                    "{cmd} --help lists --{name} twice"
                );
            }
        }
        assert!(!seen.is_empty(), "{cmd} --help lists no options");
    }
}

#[test]
fn bad_arguments_print_usage_and_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "error: no command given"),
        (&["frobnicate"], "error: unknown command 'frobnicate'"),
        (
            &["infer", "--modle", "x", "hi"],
            "error: unknown option '--modle'",
        ),
        (&["infer", "hi"], "error: --model NAME is required"),
        (&["infer", "--model"], "error: --model needs a value"),
        (
            &["infer", "--model", "m", "--top-k", "-1", "hi"],
            "error: invalid value '-1' for --top-k: expected a whole number >= 0",
        ),
        (
            &["infer", "--model", "m", "--temperature", "warm", "hi"],
            "error: invalid value 'warm' for --temperature: expected a number",
        ),
        (
            &["infer", "--model", "m", "--max-tokens=lots", "hi"],
            "error: invalid value 'lots' for --max-tokens",
        ),
        (
            &["infer", "--model", "m", "a", "b"],
            "error: infer takes one PROMPT",
        ),
        (
            &["infer", "--model", "m", "--json=yes", "a"],
            "error: --json takes no value",
        ),
        (
            &["embed", "--model", "m", "--max-tokens", "3", "a"],
            "error: unknown option",
        ),
    ];
    for (args, want) in cases {
        let o = spinfer(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = stderr(&o);
        assert!(e.starts_with(want), "{args:?}: {e}");
        assert!(e.contains("Usage:"), "{args:?}: {e}");
        assert!(o.stdout.is_empty(), "{args:?}");
    }
}

// ---------------------------------------------------------------- Spin errors

#[test]
fn access_control_error_is_spins_text_verbatim() {
    let reg = registry();
    let o = spinfer(&[
        "infer",
        "--registry",
        reg.to_str().unwrap(),
        "--model",
        "tiny-llama",
        "--allow",
        "llama2-chat",
        "--allow",
        "other",
        "hello",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: invalid-input: The component does not have access to use 'tiny-llama'. To give the component access, add 'tiny-llama' to the 'ai_models' key for the component in your spin.toml manifest\n"
    );
    assert!(o.stdout.is_empty());
    let o = spinfer(&[
        "embed",
        "--model",
        "all-minilm-l6-v2",
        "--allow",
        "x",
        "--",
        "hi",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: invalid-input: The component does not have access to use 'all-minilm-l6-v2'. To give the component access, add 'all-minilm-l6-v2' to the 'ai_models' key for the component in your spin.toml manifest\n"
    );
}

#[test]
fn the_registry_defaults_to_dot_spin_ai_models_under_the_current_directory() {
    // Run in a folder with no .spin: the default registry has no such model.
    let dir = std::env::temp_dir().join(format!("spinfer-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let o = spinfer_in(&dir, &["infer", "--model", "llama2-chat", "hello"], None);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stderr(&o),
        "error: invalid-input: no model directory found in registry for model 'llama2-chat'\n"
    );
    let o = spinfer_in(
        &dir,
        &["embed", "--model", "all-minilm-l6-v2", "hello"],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.starts_with("error: model-not-supported: ") && e.contains("all-minilm-l6-v2"),
        "{e}"
    );

    // With the fixture model laid out at ./.spin/ai-models/llama/tiny-llama it is found.
    if has_fixture("tiny-llama") {
        let dst = dir.join(".spin/ai-models/llama/tiny-llama");
        std::fs::create_dir_all(&dst).unwrap();
        for e in std::fs::read_dir(registry().join("llama/tiny-llama")).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
        let o = spinfer_in(
            &dir,
            &[
                "infer",
                "--model",
                "tiny-llama",
                "--max-tokens",
                "3",
                "--json",
                "hi",
            ],
            None,
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        assert_eq!(v["usage"]["generated_token_count"], 3);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_names_and_parameters_are_invalid_input() {
    let reg = registry();
    let reg = reg.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--model", "../llama/tiny-llama"],
            "model name \"../llama/tiny-llama\"",
        ),
        (&["--model", "tiny-llama", "--top-p", "-1"], "top_p -1 "),
        (
            &["--model", "tiny-llama", "--repeat-penalty", "0"],
            "repeat_penalty 0 ",
        ),
    ];
    for (args, want) in cases {
        let mut argv = vec!["infer", "--registry", reg];
        argv.extend_from_slice(args);
        argv.push("hi");
        let o = spinfer(&argv);
        assert_eq!(o.status.code(), Some(1), "{argv:?}");
        assert!(
            stderr(&o).starts_with(&format!("error: invalid-input: {want}")),
            "{argv:?}: {}",
            stderr(&o)
        );
    }
}

// ---------------------------------------------------------------- generation

#[test]
fn infer_json_and_streamed_output_match_the_reference() {
    if !has_fixture("tiny-llama") {
        return;
    }
    let r = reference("tiny-llama");
    let p = &r["prompts"][0];
    let prompt = p["prompt"].as_str().unwrap();
    let want = p["greedy_text"].as_str().unwrap();
    let n_new = r["n_new"].to_string();
    let reg = registry();
    let base = [
        "infer",
        "--registry",
        reg.to_str().unwrap(),
        "--model",
        "tiny-llama",
        "--temperature",
        "0",
        "--repeat-penalty",
        "1",
        "--max-tokens",
        &n_new,
    ];

    let mut args = base.to_vec();
    args.extend(["--json", prompt]);
    let o = spinfer(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["text"], want);
    assert_eq!(
        v["usage"]["prompt_token_count"],
        p["prompt_ids"].as_array().unwrap().len()
    );
    assert_eq!(
        v["usage"]["generated_token_count"],
        p["greedy_ids"].as_array().unwrap().len()
    );
    assert_eq!(v.as_object().unwrap().len(), 2);

    // Streamed: the text and one newline.
    let mut args = base.to_vec();
    args.push(prompt);
    let o = spinfer(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o), format!("{want}\n"));

    // The prompt from stdin gives the same.
    let o = spinfer_in(&root(), &base, Some(prompt));
    assert_eq!(stdout(&o), format!("{want}\n"));
    // Stdin is taken byte for byte: a trailing newline stays part of the prompt, exactly as
    // when it is passed as an argument.
    let with_nl = format!("{prompt}\n");
    let mut json = base.to_vec();
    json.push("--json");
    let from_stdin = spinfer_in(&root(), &json, Some(&with_nl));
    let mut args = json.clone();
    args.push(&with_nl);
    let from_arg = spinfer(&args);
    assert_eq!(from_stdin.status.code(), Some(0), "{}", stderr(&from_stdin));
    assert_eq!(stdout(&from_stdin), stdout(&from_arg));
    let v: Value = serde_json::from_str(&stdout(&from_stdin)).unwrap();
    assert_ne!(
        v["usage"]["prompt_token_count"],
        p["prompt_ids"].as_array().unwrap().len(),
        "the newline must add a token"
    );

    // --max-tokens 0: empty text, the prompt still counted.
    let mut args = base.to_vec();
    args.extend(["--max-tokens", "0", "--json", prompt]);
    let o = spinfer(&args);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["text"], "");
    assert_eq!(v["usage"]["generated_token_count"], 0);
    assert_eq!(
        v["usage"]["prompt_token_count"],
        p["prompt_ids"].as_array().unwrap().len()
    );

    // With --allow listing the model it works as well.
    let mut args = base.to_vec();
    args.extend(["--allow", "tiny-llama", "--json", prompt]);
    let o = spinfer(&args);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn seeded_sampling_is_reproducible_from_the_cli() {
    if !has_fixture("tiny-llama") {
        return;
    }
    let reg = registry();
    let run = |seed: &str| {
        let o = spinfer(&[
            "infer",
            "--registry",
            reg.to_str().unwrap(),
            "--model",
            "tiny-llama",
            "--seed",
            seed,
            "--temperature",
            "1.3",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--max-tokens",
            "25",
            "--json",
            "Once upon a time",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        serde_json::from_str::<Value>(&stdout(&o)).unwrap()
    };
    let a = run("123");
    assert_eq!(a, run("123"));
    assert!(["1", "2", "3", "4"]
        .iter()
        .any(|s| run(s)["text"] != a["text"]));
}

#[test]
fn prompt_too_long_names_the_lengths() {
    if !has_fixture("llama-mha-f32") {
        return;
    }
    let reg = registry();
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(200);
    let o = spinfer(&[
        "infer",
        "--registry",
        reg.to_str().unwrap(),
        "--model",
        "llama-mha-f32",
        &prompt,
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.starts_with("error: invalid-input: the prompt is "), "{e}");
    assert!(e.contains("has a context of 512 tokens"), "{e}");
}

// ---------------------------------------------------------------- embeddings

fn bert_registry_with(model: &str) -> Option<PathBuf> {
    for reg in [registry(), root().join("fixtures/real/registry")] {
        if reg.join(model).join("model.safetensors").is_file() {
            return Some(reg);
        }
    }
    eprintln!("no {model} embedding model yet: skipped");
    None
}

#[test]
fn embed_json_parses_and_matches_the_reference_count() {
    let Some(reg) = bert_registry_with("tiny-bert") else {
        return;
    };
    let r: Value = serde_json::from_slice(
        &std::fs::read(root().join("fixtures/reference/bert/tiny-bert.json")).unwrap(),
    )
    .unwrap();
    // Two one-line texts (the stdin form reads one text per line).
    let s0 = &r["sentences"][3];
    let s1 = &r["sentences"][4];
    let t0 = s0["text"].as_str().unwrap();
    let t1 = s1["text"].as_str().unwrap();
    let reg_s = reg.to_str().unwrap();
    let o = spinfer(&[
        "embed",
        "--registry",
        reg_s,
        "--model",
        "tiny-bert",
        "--json",
        "--",
        t0,
        t1,
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    let embs = v["embeddings"].as_array().unwrap();
    assert_eq!(embs.len(), 2);
    assert_eq!(
        v["usage"]["prompt_token_count"].as_u64().unwrap(),
        s0["token_count"].as_u64().unwrap() + s1["token_count"].as_u64().unwrap()
    );
    for (e, s) in embs.iter().zip([s0, s1]) {
        let cos: f64 = e
            .as_array()
            .unwrap()
            .iter()
            .zip(s["embedding"].as_array().unwrap())
            .map(|(a, b)| a.as_f64().unwrap() * b.as_f64().unwrap())
            .sum();
        assert!(cos > 0.9999, "cosine {cos}");
    }

    // One text per stdin line gives the same vectors; the plain form prints one line each.
    let o = spinfer_in(
        &root(),
        &[
            "embed",
            "--registry",
            reg_s,
            "--model",
            "tiny-bert",
            "--json",
        ],
        Some(&format!("{t0}\n{t1}\n")),
    );
    let v2: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v2, v);
    let o = spinfer(&[
        "embed",
        "--registry",
        reg_s,
        "--model",
        "tiny-bert",
        "--",
        t0,
        t1,
    ]);
    assert_eq!(o.status.code(), Some(0));
    let lines: Vec<&str> = std::str::from_utf8(&o.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 2);
    for (line, e) in lines.iter().zip(embs) {
        let xs: Vec<f32> = line.split(' ').map(|x| x.parse().unwrap()).collect();
        let want: Vec<f32> = e
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(xs, want);
    }
}

/// `infer --chat` renders the model's chat template around the prompt (the same text as
/// rendering it by hand and running plain `infer`), and `chat` answers each stdin line the
/// same way, keeping the conversation.
#[test]
fn chat_mode_applies_the_models_template() {
    let real = root().join("fixtures/real/registry");
    if !real.join("llama/smollm2-135m-instruct").is_dir() {
        eprintln!("the real SmolLM2 is absent (fixtures/fetch-smollm2.sh): skipped");
        return;
    }
    let engine = spinfer::Engine::new(&real);
    let model = "smollm2-135m-instruct";
    let q = "What is 12 times 7?";
    let rendered = engine
        .chat_prompt(model, &[spinfer::ChatMessage::new("user", q)])
        .unwrap();
    let reg = real.to_str().unwrap();
    let base = [
        "--registry",
        reg,
        "--model",
        model,
        "--temperature",
        "0",
        "--max-tokens",
        "24",
    ];
    let run = |cmd: &str, extra: &[&str], stdin: Option<&str>| {
        let mut args = vec![cmd];
        args.extend(base);
        args.extend(extra);
        let o = spinfer_in(&root(), &args, stdin);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        stdout(&o)
    };
    let by_hand = run("infer", &[&rendered], None);
    assert_eq!(run("infer", &["--chat", q], None), by_hand);
    let two_turns = run("chat", &[], Some(&format!("{q}\nAnd 12 times 8?\n")));
    assert!(
        two_turns.starts_with(&by_hand),
        "{two_turns:?} vs {by_hand:?}"
    );
    assert!(
        two_turns.len() > by_hand.len(),
        "the second line got no answer"
    );
    // --system without --chat is a usage error.
    let o = spinfer(&["infer", "--model", model, "--system", "be brief", "hi"]);
    assert_eq!(o.status.code(), Some(2));
}
