//! spinfer::tokenizer (the fast tokenizer.json loader) against tokenizers' own loader: the same
//! tokenizer for every fixture (and the bench/real models where present), the same outcome on
//! odd or corrupt files, and model loads that name the file when it is bad.

use serde_json::{json, Value};
use spinfer::internals::llama::LlamaModel;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Every tokenizer.json we can find: the fixtures, plus bench and real models when present.
fn tokenizer_files() -> Vec<PathBuf> {
    let mut out = vec![];
    let mut add_dirs = |dir: PathBuf| {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            let mut v: Vec<PathBuf> = rd
                .map(|e| e.unwrap().path().join("tokenizer.json"))
                .filter(|p| p.is_file())
                .collect();
            v.sort();
            out.extend(v);
        }
    };
    add_dirs(root().join("registry/llama"));
    add_dirs(root().join("registry"));
    add_dirs(root().join("bench-models/llama"));
    add_dirs(root().join("real/registry"));
    assert!(out.len() >= 10, "{out:?}");
    out
}

const TEXTS: &[&str] = &[
    "",
    " ",
    "Hello world",
    "  leading and trailing spaces  ",
    "Hello, world! How are you today?\nNew line\ttab",
    "<s>",
    "<s> Hello </s> world <unk>",
    "[CLS] bert [SEP] [MASK] [PAD] [UNK]",
    "über naïve café — 日本語のテキスト 🦀🎉 \u{1F600}",
    "byte fallback: \u{0} \u{7f} \u{10FFFF} ỹ",
    "numbers 1234567890 and symbols #$%^&*()_+{}|:\"<>?",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "the quick brown fox jumps over the lazy dog THE QUICK BROWN FOX",
];

/// Same serialized form (vocab, merges by rank, added tokens with ids, every component and
/// option), same encodings and decodings.
fn assert_same(a: &Tokenizer, b: &Tokenizer, what: &str) {
    // (Two tokens with one id would make this depend on hash order; no case has them.)
    assert!(
        serde_json::to_value(a).unwrap() == serde_json::to_value(b).unwrap(),
        "{what}: different serialized tokenizers"
    );
    assert_eq!(a.get_vocab_size(true), b.get_vocab_size(true), "{what}");
    assert_eq!(a.get_vocab_size(false), b.get_vocab_size(false), "{what}");
    assert_eq!(a.get_vocab(true), b.get_vocab(true), "{what}");
    for text in TEXTS {
        for special in [false, true] {
            let ea = a.encode(*text, special).unwrap();
            let eb = b.encode(*text, special).unwrap();
            let ctx = format!("{what}: {text:?} add_special={special}");
            assert_eq!(ea.get_ids(), eb.get_ids(), "{ctx}");
            assert_eq!(ea.get_tokens(), eb.get_tokens(), "{ctx}");
            assert_eq!(ea.get_offsets(), eb.get_offsets(), "{ctx}");
            assert_eq!(
                ea.get_special_tokens_mask(),
                eb.get_special_tokens_mask(),
                "{ctx}"
            );
            for skip in [false, true] {
                assert_eq!(
                    a.decode(ea.get_ids(), skip).unwrap(),
                    b.decode(ea.get_ids(), skip).unwrap(),
                    "{ctx} skip_special={skip}"
                );
            }
        }
    }
    let all: Vec<u32> = (0..a.get_vocab_size(true) as u32).step_by(7).collect();
    assert_eq!(
        a.decode(&all, false).unwrap(),
        b.decode(&all, false).unwrap(),
        "{what}"
    );
}

fn check_text(text: &str, what: &str) {
    let plain: Tokenizer = text.parse().unwrap();
    let fast = spinfer::internals::tokenizer::from_str(text).unwrap();
    assert_same(&plain, &fast, what);
}

#[test]
fn fast_loader_matches_tokenizers_on_every_tokenizer_file() {
    for path in tokenizer_files() {
        let what = path.display().to_string();
        let plain = Tokenizer::from_file(&path).unwrap();
        let fast = spinfer::internals::tokenizer::from_file(&path).unwrap();
        assert_same(&plain, &fast, &what);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            spinfer::internals::tokenizer::try_fast(&text).is_some(),
            "{what}: no fast path"
        );

        let mut v: Value = serde_json::from_str(&text).unwrap();
        if v["model"]["type"] == "BPE" {
            // The legacy "a b" form of the merges, with a "#version" line.
            let merges = v["model"]["merges"].as_array().unwrap().clone();
            let mut legacy = vec![json!("#version: 0.2")];
            for m in merges {
                let (a, b) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
                assert!(!a.contains(' ') && !b.contains(' '));
                legacy.push(json!(format!("{a} {b}")));
            }
            v["model"]["merges"] = json!(legacy);
            let text = v.to_string();
            assert!(
                spinfer::internals::tokenizer::try_fast(&text).is_some(),
                "{what}: no fast path"
            );
            check_text(&text, &format!("{what} (legacy merges)"));
        }
        // An added token the model's vocab lacks gets the next id after the full vocab.
        v["added_tokens"].as_array_mut().unwrap().push(
            json!({"id": 0, "content": "<extra_tok>", "single_word": false,
                         "lstrip": true, "rstrip": false, "normalized": false, "special": true}),
        );
        v["added_tokens"].as_array_mut().unwrap().push(
            json!({"id": 0, "content": "plain word", "single_word": true,
                         "lstrip": false, "rstrip": true, "normalized": true, "special": false}),
        );
        let text = v.to_string();
        check_text(&text, &format!("{what} (extra added tokens)"));
        let t = spinfer::internals::tokenizer::from_str(&text).unwrap();
        assert!(t.token_to_id("<extra_tok>").unwrap() as usize >= t.get_vocab_size(false));
    }
}

/// Edits of the tiny-llama and tiny-bert tokenizers: whatever tokenizers makes of each (a
/// tokenizer or an error), the fast loader makes the same, without panicking.
#[test]
fn odd_and_corrupt_files_load_or_fail_as_with_tokenizers() {
    let llama =
        std::fs::read_to_string(root().join("registry/llama/tiny-llama/tokenizer.json")).unwrap();
    let bert = std::fs::read_to_string(root().join("registry/tiny-bert/tokenizer.json")).unwrap();
    let mut cases: Vec<(String, String)> = vec![
        ("empty".into(), String::new()),
        ("truncated".into(), llama[..llama.len() / 2].to_string()),
        ("not json".into(), "hello".into()),
        ("array".into(), "[]".into()),
        ("empty object".into(), "{}".into()),
    ];
    type Edit = fn(&mut Value);
    let edits: &[(&str, Edit)] = &[
        ("version 2", |v| v["version"] = json!("2.0")),
        ("version null", |v| v["version"] = Value::Null),
        ("no version", |v| {
            v.as_object_mut().unwrap().remove("version");
        }),
        ("no model", |v| {
            v.as_object_mut().unwrap().remove("model");
        }),
        ("model null", |v| v["model"] = Value::Null),
        ("model type missing", |v| {
            v["model"].as_object_mut().unwrap().remove("type");
        }),
        ("model type unknown", |v| v["model"]["type"] = json!("Nope")),
        ("model type WordLevel", |v| {
            v["model"]["type"] = json!("WordLevel")
        }),
        ("vocab null", |v| v["model"]["vocab"] = Value::Null),
        ("vocab missing", |v| {
            v["model"].as_object_mut().unwrap().remove("vocab");
        }),
        ("vocab id negative", |v| {
            v["model"]["vocab"]["a"] = json!(-1)
        }),
        ("vocab id float", |v| v["model"]["vocab"]["a"] = json!(1.5)),
        ("vocab id string", |v| v["model"]["vocab"]["a"] = json!("1")),
        ("vocab escaped key", |v| {
            v["model"]["vocab"]["q\"\\\u{1}"] = json!(100_000)
        }),
        ("merges missing", |v| {
            if let Some(m) = v["model"].as_object_mut() {
                m.remove("merges");
            }
        }),
        ("merges null", |v| v["model"]["merges"] = Value::Null),
        ("merges empty", |v| v["model"]["merges"] = json!([])),
        ("merge of three", |v| {
            v["model"]["merges"][0] = json!(["a", "b", "c"])
        }),
        ("merge of one", |v| v["model"]["merges"][0] = json!(["a"])),
        ("merge line of three", |v| {
            v["model"]["merges"] = json!(["a b c"])
        }),
        ("merge line of one", |v| {
            v["model"]["merges"] = json!(["ab"])
        }),
        ("merges mixed", |v| v["model"]["merges"][1] = json!("a b")),
        ("merge number", |v| v["model"]["merges"][0] = json!(5)),
        ("merge unknown token", |v| {
            v["model"]["merges"][0] = json!(["zz", "qq"])
        }),
        ("dropout 2", |v| v["model"]["dropout"] = json!(2.0)),
        ("dropout 1 (deterministic)", |v| {
            v["model"]["dropout"] = json!(1.0)
        }),
        ("unk null", |v| v["model"]["unk_token"] = Value::Null),
        ("byte_fallback string", |v| {
            v["model"]["byte_fallback"] = json!("yes")
        }),
        ("ignore_merges", |v| {
            v["model"]["ignore_merges"] = json!(true)
        }),
        ("prefix/suffix", |v| {
            v["model"]["continuing_subword_prefix"] = json!("##");
            v["model"]["end_of_word_suffix"] = json!("</w>");
        }),
        ("max chars null", |v| {
            v["model"]["max_input_chars_per_word"] = Value::Null
        }),
        ("max chars missing", |v| {
            v["model"]
                .as_object_mut()
                .unwrap()
                .remove("max_input_chars_per_word");
        }),
        ("unknown top-level key", |v| {
            v["extra"] = json!({"x": [1, 2]})
        }),
        ("unknown model key", |v| {
            v["model"]["extra"] = json!({"x": [1, 2]})
        }),
        ("unknown added token key", |v| {
            v["added_tokens"][0]["extra"] = json!(1)
        }),
        ("added_tokens null", |v| v["added_tokens"] = Value::Null),
        ("added_tokens missing", |v| {
            v.as_object_mut().unwrap().remove("added_tokens");
        }),
        ("added token missing a field", |v| {
            v["added_tokens"][0]
                .as_object_mut()
                .unwrap()
                .remove("lstrip");
        }),
        ("added token empty", |v| {
            v["added_tokens"][0]["content"] = json!("")
        }),
        ("normalizer null", |v| v["normalizer"] = Value::Null),
        ("normalizer bad", |v| {
            v["normalizer"] = json!({"type": "Nope"})
        }),
        ("decoder bad", |v| v["decoder"] = json!(3)),
        ("post_processor null", |v| v["post_processor"] = Value::Null),
        ("truncation", |v| {
            v["truncation"] = json!({"direction": "Right", "max_length": 5,
                                     "strategy": "LongestFirst", "stride": 0})
        }),
        ("padding", |v| {
            v["padding"] = json!({"strategy": "BatchLongest", "direction": "Right",
                "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "<unk>"})
        }),
    ];
    for (name, base) in [("llama", &llama), ("bert", &bert)] {
        let v: Value = serde_json::from_str(base).unwrap();
        for (what, edit) in edits {
            if name == "bert" && what.starts_with("merge") {
                continue; // WordPiece has no merges
            }
            let mut e = v.clone();
            edit(&mut e);
            cases.push((format!("{name}: {what}"), e.to_string()));
        }
    }
    // A duplicate key, which Value cannot express.
    cases.push((
        "duplicate model key".into(),
        llama.replacen("\"model\":{", "\"model\":{\"fuse_unk\":false,", 1),
    ));
    cases.push((
        "duplicate top-level key".into(),
        llama.replacen("{", "{\"decoder\":null,", 1),
    ));
    let mut loaded = 0;
    for (what, text) in &cases {
        // tokenizers panics on some odd files; the fast loader reports an error instead.
        let plain = std::panic::catch_unwind(|| text.parse::<Tokenizer>())
            .unwrap_or_else(|_| Err("panicked".into()));
        let fast = spinfer::internals::tokenizer::from_str(text);
        match (&plain, &fast) {
            (Ok(a), Ok(b)) => {
                assert_same(a, b, what);
                loaded += 1;
            }
            (Err(_), Err(_)) => {}
            _ => panic!(
                "{what}: tokenizers {:?}, fast loader {:?}",
                plain.as_ref().err().map(|e| e.to_string()),
                fast.as_ref().err().map(|e| e.to_string())
            ),
        }
    }
    assert!(
        loaded >= 10 && loaded < cases.len(),
        "{loaded} of {}",
        cases.len()
    );
}

struct TempDir(PathBuf);

impl TempDir {
    fn copy_of(src: &Path, tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "spinfer-tokenizer-test-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn corrupt_tokenizer_file_is_an_error_naming_it() {
    let src = root().join("registry/llama/tiny-llama");
    let bad: [&[u8]; 4] = [
        b"",
        b"{\"model\":",
        b"\xff\xfe not utf-8",
        b"{\"model\":{\"type\":\"BPE\",\"vocab\":{},\"merges\":[\"a\"]}}",
    ];
    for (i, bytes) in bad.iter().enumerate() {
        let d = TempDir::copy_of(&src, &format!("llama{i}"));
        std::fs::write(d.0.join("tokenizer.json"), bytes).unwrap();
        let e = match LlamaModel::load(&d.0) {
            Ok(_) => panic!("case {i}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("tokenizer.json"), "case {i}: {e}");
        assert!(
            spinfer::internals::tokenizer::from_file(&d.0.join("tokenizer.json")).is_err(),
            "case {i}"
        );
    }
    let e = spinfer::internals::tokenizer::from_file(&src.join("no-such-file.json")).unwrap_err();
    assert!(e.to_string().contains("No such file"), "{e}");
}
