//! A `tokenizers::Tokenizer` built from a GGUF file's `tokenizer.ggml.*` metadata, behaving as
//! llama.cpp's tokenizer (src/llama-vocab.cpp) for the two vocab types Llama-family files use:
//!
//! - `gpt2`: byte-level BPE. Tokens and merges from the file; the text is split by the regexes
//!   llama.cpp picks from `tokenizer.ggml.pre` (applied in sequence, each splitting the pieces
//!   of the one before, as llama.cpp's `unicode_regex_split` does), then mapped to the byte
//!   alphabet and merged by rank.
//! - `llama`: SentencePiece BPE. llama.cpp repeatedly merges the adjacent pair whose join is a
//!   token of highest score; here that is a BPE whose merges are every (left, right) split of
//!   every token, ranked by the joined token's score (ties: lower id first). Spaces become `▁`,
//!   each text piece gets a leading `▁` when `add_space_prefix` (llama.cpp prefixes the first
//!   piece and every piece after a special token), pieces without a token fall back to the
//!   `<0xNN>` byte tokens.
//!
//! Control and unknown tokens (token_type 3, 2) are added as special tokens and user-defined
//! ones (4) as added tokens, all matched whole in the raw text as llama.cpp's special-token partition does, so
//! `<|im_start|>` in a prompt is one token. BOS/EOS are added by a post-processor when
//! `tokenizer.ggml.add_bos_token` / `add_eos_token` say so (llama.cpp's defaults otherwise).

use crate::weights::gguf::{GgufError, Metadata};
use crate::weights::WeightStore;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior, Tokenizer,
};

/// A tokenizer with the special ids a generator needs.
pub struct GgufTokenizer {
    pub tokenizer: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether `encode(.., add_special_tokens = true)` adds BOS / EOS (the post-processor does).
    pub add_bos: bool,
    pub add_eos: bool,
}

/// llama.cpp's token types (`llama_token_type`).
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// The tokenizer for a GGUF model: `tokenizer.json` beside the (first) .gguf file when there
/// is one, else built from the metadata. BOS/EOS ids and flags come from the metadata either
/// way.
pub fn tokenizer_for(store: &WeightStore) -> crate::Result<GgufTokenizer> {
    let meta = store.metadata().ok_or_else(|| {
        crate::Error::runtime(format!("{} is not a GGUF model", store.describe()))
    })?;
    let json = store
        .paths()
        .next()
        .and_then(|p| p.parent())
        .map(|d| d.join("tokenizer.json"))
        .filter(|p| p.is_file());
    match json {
        Some(path) => {
            let tokenizer = super::from_file(&path).map_err(|e| {
                crate::Error::runtime(format!("cannot load {}: {e}", path.display()))
            })?;
            let s = specials(meta)?;
            Ok(GgufTokenizer {
                tokenizer,
                bos: s.bos,
                eos: s.eos,
                add_bos: s.add_bos,
                add_eos: s.add_eos,
            })
        }
        None => Ok(tokenizer_from_gguf(meta)?),
    }
}

struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
}

/// BOS/EOS ids and whether to add them; the defaults are llama.cpp's for the vocab type (SPM
/// adds BOS, BPE adds it only for some pre-tokenizers).
fn specials(meta: &Metadata) -> Result<Specials, GgufError> {
    let model = meta.get_str("tokenizer.ggml.model")?.unwrap_or("");
    let pre = meta.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
    let default_bos = match model {
        "llama" => true,
        "gpt2" => pre_tokenizer(pre).map(|p| p.add_bos).unwrap_or(false),
        _ => false,
    };
    Ok(Specials {
        bos: meta.get_u32("tokenizer.ggml.bos_token_id")?,
        eos: meta.get_u32("tokenizer.ggml.eos_token_id")?,
        add_bos: meta
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(default_bos),
        add_eos: meta
            .get_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false),
    })
}

/// Builds the tokenizer from `tokenizer.ggml.*` metadata. An unknown vocab type or
/// pre-tokenizer is an error naming it.
pub fn tokenizer_from_gguf(meta: &Metadata) -> Result<GgufTokenizer, GgufError> {
    let src = meta.source();
    let model = meta.require("tokenizer.ggml.model", meta.get_str("tokenizer.ggml.model"))?;
    if model != "gpt2" && model != "llama" {
        return Err(GgufError::unsupported(format!(
            "{src}: tokenizer.ggml.model {model:?} is not supported (gpt2 and llama are)"
        )));
    }
    let tokens = meta.require(
        "tokenizer.ggml.tokens",
        meta.get_str_array("tokenizer.ggml.tokens"),
    )?;
    let n = tokens.len();
    let types = meta
        .get_i32_array("tokenizer.ggml.token_type")?
        .unwrap_or_default();
    if !types.is_empty() && types.len() != n {
        return Err(GgufError::invalid(format!(
            "{src}: tokenizer.ggml.token_type has {} entries for {n} tokens",
            types.len()
        )));
    }
    let specials = specials(meta)?;
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", specials.bos),
        ("tokenizer.ggml.eos_token_id", specials.eos),
    ] {
        if id.is_some_and(|id| id as usize >= n) {
            return Err(GgufError::invalid(format!(
                "{src}: {key} is {}, past the {n} tokens",
                id.unwrap_or_default()
            )));
        }
    }
    // Vocab: later duplicates win, as llama.cpp's token_to_id map does.
    let mut vocab = Vocab::with_capacity(n);
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), i as u32);
    }

    let mut tok: Tokenizer = match model {
        "gpt2" => {
            let pre_name = meta.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
            let pre = pre_tokenizer(pre_name).ok_or_else(|| {
                GgufError::unsupported(format!(
                    "{src}: tokenizer.ggml.pre {pre_name:?} is a pre-tokenizer spinfer does not know"
                ))
            })?;
            let merges = meta.require(
                "tokenizer.ggml.merges",
                meta.get_str_array("tokenizer.ggml.merges"),
            )?;
            let merges = merges
                .iter()
                .filter_map(|m| {
                    // llama.cpp splits at the first space after the first byte (a space
                    // is never inside a character, so: after the first character).
                    let first = m.chars().next()?.len_utf8();
                    let pos = m[first..].find(' ')? + first;
                    let (a, b) = (&m[..pos], &m[pos + 1..]);
                    // tokenizers refuses merges of pieces it does not know; llama.cpp can never
                    // produce such a pair from vocab tokens either.
                    let known = vocab.contains_key(a)
                        && vocab.contains_key(b)
                        && vocab.contains_key(&format!("{a}{b}"));
                    known.then(|| (a.to_string(), b.to_string()))
                })
                .collect();
            let bpe = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .ignore_merges(pre.ignore_merges)
                .build()
                .map_err(|e| GgufError::invalid(format!("{src}: BPE vocab: {e}")))?;
            let mut splits: Vec<PreTokenizerWrapper> = Vec::new();
            for re in pre.regexes {
                let split = Split::new(
                    SplitPattern::Regex(re.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| GgufError::invalid(format!("pre-tokenizer {pre_name:?}: {e}")))?;
                splits.push(split.into());
            }
            splits.push(ByteLevel::new(false, true, false).into());
            let mut tok = Tokenizer::new(bpe);
            tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(
                splits,
            ))));
            tok.with_decoder(Some(ByteLevel::default()));
            tok
        }
        "llama" => {
            let scores = meta.require(
                "tokenizer.ggml.scores",
                meta.get_f32_array("tokenizer.ggml.scores"),
            )?;
            if scores.len() != n {
                return Err(GgufError::invalid(format!(
                    "{src}: tokenizer.ggml.scores has {} entries for {n} tokens",
                    scores.len()
                )));
            }
            let merges = spm_merges(tokens, &scores, &vocab);
            let mut b = BPE::builder()
                .vocab_and_merges(vocab, merges)
                .byte_fallback(true)
                .fuse_unk(true);
            if let Some(unk) = meta.get_u32("tokenizer.ggml.unknown_token_id")? {
                let t = tokens.get(unk as usize).ok_or_else(|| {
                    GgufError::invalid(format!(
                        "{src}: tokenizer.ggml.unknown_token_id is {unk}, past the {n} tokens"
                    ))
                })?;
                b = b.unk_token(t.clone());
            }
            let bpe = b
                .build()
                .map_err(|e| GgufError::invalid(format!("{src}: SentencePiece vocab: {e}")))?;
            let prefix = meta
                .get_bool("tokenizer.ggml.add_space_prefix")?
                .unwrap_or(true);
            let mut norm: Vec<NormalizerWrapper> = Vec::new();
            if prefix {
                norm.push(Prepend::new("\u{2581}".into()).into());
            }
            norm.push(
                Replace::new(" ", "\u{2581}")
                    .map_err(|e| GgufError::invalid(e.to_string()))?
                    .into(),
            );
            let mut dec: Vec<DecoderWrapper> = vec![
                Replace::new("\u{2581}", " ")
                    .map_err(|e| GgufError::invalid(e.to_string()))?
                    .into(),
                ByteFallback::new().into(),
                Fuse::new().into(),
            ];
            if prefix {
                dec.push(Strip::new(' ', 1, 0).into());
            }
            let mut tok = Tokenizer::new(bpe);
            tok.with_normalizer(Some(NormalizerSequence::new(norm)))
                .map_err(|e| GgufError::invalid(format!("{src}: normalizer: {e}")))?;
            tok.with_decoder(Some(DecoderSequence::new(dec)));
            tok
        }
        _ => unreachable!("model checked above"),
    };

    // Control, unknown and user-defined tokens, matched whole in raw text (llama.cpp's
    // special-token partition takes all three when parsing specials, as a prompt is parsed).
    let added = |want: &[i32], special: bool| -> Vec<AddedToken> {
        types
            .iter()
            .zip(tokens)
            .filter(|(t, _)| want.contains(t))
            .map(|(_, s)| AddedToken::from(s.clone(), special).normalized(false))
            .collect()
    };
    tok.add_special_tokens(added(&[CONTROL, UNKNOWN], true))
        .map_err(|e| GgufError::invalid(format!("{src}: control tokens: {e}")))?;
    tok.add_tokens(added(&[USER_DEFINED], false))
        .map_err(|e| GgufError::invalid(format!("{src}: user-defined tokens: {e}")))?;

    let mut single = Vec::new();
    let mut special_tokens = Vec::new();
    for (add, id) in [
        (specials.add_bos, specials.bos),
        (specials.add_eos, specials.eos),
    ] {
        if !add {
            continue;
        }
        let id = id.ok_or_else(|| {
            GgufError::invalid(format!(
                "{src}: the file asks to add BOS/EOS but gives no id for it"
            ))
        })?;
        special_tokens.push((tokens[id as usize].clone(), id));
    }
    if !special_tokens.is_empty() {
        if specials.add_bos {
            single.push(special_tokens[0].0.clone());
        }
        single.push("$A".to_string());
        if specials.add_eos {
            single.push(special_tokens[special_tokens.len() - 1].0.clone());
        }
        let pair: Vec<String> = single
            .iter()
            .cloned()
            .chain(single.iter().map(|s| {
                if s == "$A" {
                    "$B".to_string()
                } else {
                    s.clone()
                }
            }))
            .collect();
        let tp = TemplateProcessing::builder()
            .try_single(single)
            .and_then(|b| b.try_pair(pair))
            .map_err(|e| GgufError::invalid(format!("{src}: post-processor: {e}")))?
            .special_tokens(special_tokens)
            .build()
            .map_err(|e| GgufError::invalid(format!("{src}: post-processor: {e}")))?;
        tok.with_post_processor(Some(PostProcessorWrapper::Template(tp)));
    }
    Ok(GgufTokenizer {
        tokenizer: tok,
        bos: specials.bos,
        eos: specials.eos,
        add_bos: specials.add_bos,
        add_eos: specials.add_eos,
    })
}

/// Every (left, right) split of every token whose halves are tokens, best joined score first
/// (ties: lower joined id first): tokenizers' BPE then merges as llama.cpp's SPM session does.
fn spm_merges(tokens: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    let mut ranked: Vec<(f32, u32, usize, String, String)> = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        if vocab.get(t) != Some(&(id as u32)) {
            continue; // a duplicate: the later id is the one text maps to
        }
        for (pos, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(pos);
            if vocab.contains_key(a) && vocab.contains_key(b) {
                ranked.push((scores[id], id as u32, pos, a.to_string(), b.to_string()));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
    ranked.into_iter().map(|(_, _, _, a, b)| (a, b)).collect()
}

/// How llama.cpp pre-tokenizes a byte-level BPE vocab.
struct PreTokenizer {
    regexes: &'static [&'static str],
    ignore_merges: bool,
    add_bos: bool,
}

/// GPT-2's split (llama.cpp's `unicode_regex_split_custom_gpt2` implements this one).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Tekken and GPT-4o: the tokenizer.json originals (llama.cpp rewrites them for its own regex
/// engine, which lacks the \p{Lu}-style classes fancy-regex has).
const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's pre-tokenizer for a `tokenizer.ggml.pre` name (llama_vocab::impl::load and
/// llm_tokenizer_bpe), for the names whose regexes we carry; None for the others.
fn pre_tokenizer(name: &str) -> Option<PreTokenizer> {
    let p = |regexes, ignore_merges, add_bos| PreTokenizer {
        regexes,
        ignore_merges,
        add_bos,
    };
    Some(match name {
        "default" => p(
            &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => p(&[LLAMA3], true, true),
        "dbrx" | "smaug-bpe" | "glm4" | "chatglm-bpe" => p(&[LLAMA3], false, false),
        "tekken" => p(&[TEKKEN], true, true),
        "falcon" => p(
            &[r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => p(&[r"\p{N}", GPT2], false, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais" | "trillion"
        | "granite-docling" | "exaone4" => p(&[GPT2], false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => p(&[QWEN2], false, false),
        "qwen35" => p(&[QWEN35], false, false),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => p(&[GPT4O], false, false),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name llama.cpp maps to a pre-tokenizer we carry (llama-vocab.cpp, 2026), with
    /// regexes fancy-regex compiles; names we do not carry give None.
    #[test]
    fn every_known_pre_tokenizer_compiles() {
        let known = [
            "default",
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
            "glm4",
            "chatglm-bpe",
            "tekken",
            "falcon",
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
            "qwen35",
            "gpt-4o",
            "llama4",
            "kanana2",
            "talkie",
            "minimax-m2",
        ];
        for name in known {
            let p = pre_tokenizer(name).unwrap_or_else(|| panic!("{name}"));
            for re in p.regexes {
                Split::new(
                    SplitPattern::Regex(re.to_string()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        for name in [
            "deepseek-llm",
            "deepseek-coder",
            "viking",
            "bloom",
            "",
            "SMOLLM",
        ] {
            assert!(pre_tokenizer(name).is_none(), "{name}");
        }
    }

    /// Merges from scores: the best-scored join first, every split of a token kept.
    #[test]
    fn spm_merges_rank_by_joined_score() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let mut vocab = Vocab::new();
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), i as u32);
        }
        let m = spm_merges(&tokens, &scores, &vocab);
        let m: Vec<(&str, &str)> = m.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        assert_eq!(m, [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]);
    }
}
