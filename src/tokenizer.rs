//! Fast loading of tokenizer.json files with a BPE (Llama) or WordPiece (BERT) model.
//!
//! Why: `tokenizers::Tokenizer::from_file` is most of a model's load time. Its model
//! deserializer buffers the whole `model` object three times (serde's untagged-enum `Content`,
//! then a `serde_json::Value` via `#[serde(flatten)]`, then the model's visitor), allocating a
//! String per vocab entry at each step: ~13 ms for a 32000-token Llama file, ~15 ms for
//! MiniLM's. This loader reads the file once into typed structs that borrow from it (vocab
//! keys and merges as `&str` where unescaped, the vocab map then built at its final size);
//! only the small parts (normalizer, pre-tokenizer, post-processor, decoder, truncation,
//! padding) go through tokenizers' own deserializers. It then assembles the tokenizer the way
//! tokenizers' deserializer does (model via its builder, `TokenizerBuilder`, then the added
//! tokens against the full model), so the result is the same `tokenizers::Tokenizer`
//! (tests/tokenizer.rs compares the serialized forms and encodings).
//!
//! What remains (~6-9 ms for TinyLlama) is mostly page faults on freshly allocated memory:
//! the BPE builder's vocab, reverse vocab and merge map cannot be built any other way.
//!
//! Anything that does not fit (another model type, an unknown version, an unknown or duplicate
//! key, a malformed file...) goes to the plain `Tokenizer::from_str`, which also supplies the
//! error.

pub mod gguf;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;
use std::path::Path;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PaddingParams,
    PostProcessorWrapper, PreTokenizerWrapper, Tokenizer, TokenizerBuilder, TruncationParams,
};

/// `Tokenizer::from_file`, faster for BPE and WordPiece models; same tokenizer, and errors
/// from the same parser.
/// The file is mapped, not read: copying it into a fresh buffer page-faults every page.
pub fn from_file(path: &Path) -> tokenizers::Result<Tokenizer> {
    let file = std::fs::File::open(path)?;
    // SAFETY: the map is read while this function runs; like any reader we assume nobody
    // truncates the file meanwhile (the same assumption the weights' maps make).
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let text = std::str::from_utf8(&map)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    from_str(text)
}

/// `text.parse::<Tokenizer>()`, faster for BPE and WordPiece models.
/// A panic inside tokenizers (it has some on odd files, e.g. a merge shorter than
/// `continuing_subword_prefix`) becomes an error.
pub fn from_str(text: &str) -> tokenizers::Result<Tokenizer> {
    std::panic::catch_unwind(|| match try_fast(text) {
        Some(t) => Ok(t),
        None => text.parse(),
    })
    .unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Err(format!("the tokenizers library failed on this file: {msg}").into())
    })
}

/// The fast path alone: None where it does not apply (`from_str` then uses the plain parser).
/// Public so tests can check that it applies.
pub fn try_fast(text: &str) -> Option<Tokenizer> {
    let file: FileJson<'_> = serde_json::from_str(text).ok()?;
    if file.version.as_deref().is_some_and(|v| v != "1.0") {
        return None;
    }
    let model = match file.model.kind.as_deref() {
        Some("BPE") => ModelWrapper::BPE(file.model.bpe()?),
        Some("WordPiece") => ModelWrapper::WordPiece(file.model.wordpiece()?),
        _ => return None,
    };
    let mut tok = TokenizerBuilder::<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(model)
    .with_truncation(file.truncation)
    .with_padding(file.padding)
    .with_normalizer(file.normalizer)
    .with_pre_tokenizer(file.pre_tokenizer)
    .with_post_processor(file.post_processor)
    .with_decoder(file.decoder)
    .build()
    .ok()?;
    tok.add_tokens(file.added_tokens.into_iter().map(|t| AddedToken {
        content: t.content,
        single_word: t.single_word,
        lstrip: t.lstrip,
        rstrip: t.rstrip,
        normalized: t.normalized,
        special: t.special,
    }))
    .ok()?;
    Some(Tokenizer::from(tok))
}

/// The top level of tokenizer.json. Field types follow tokenizers' own visitor: `version` and
/// `added_tokens` may be absent but not null; the optional parts may be null. An unknown key
/// is an error there (its visitor does not consume the value), so it is refused here too.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileJson<'a> {
    #[serde(default, borrow, deserialize_with = "present")]
    version: Option<Cow<'a, str>>,
    truncation: Option<TruncationParams>,
    padding: Option<PaddingParams>,
    #[serde(default)]
    added_tokens: Vec<AddedTokenJson>,
    normalizer: Option<NormalizerWrapper>,
    pre_tokenizer: Option<PreTokenizerWrapper>,
    post_processor: Option<PostProcessorWrapper>,
    decoder: Option<DecoderWrapper>,
    #[serde(borrow)]
    model: ModelJson<'a>,
}

/// A field that may be missing (None) but, when present, must be a T (not null).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// tokenizers' `AddedTokenWithId` (its `id` is only checked against the model, with a warning).
#[derive(Deserialize)]
struct AddedTokenJson {
    #[allow(dead_code)]
    id: u32,
    content: String,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
    normalized: bool,
    special: bool,
}

/// The fields of a BPE or WordPiece model (unknown ones ignored, as tokenizers does).
#[derive(Deserialize)]
struct ModelJson<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<Cow<'a, str>>,
    dropout: Option<f32>,
    unk_token: Option<String>,
    continuing_subword_prefix: Option<String>,
    end_of_word_suffix: Option<String>,
    fuse_unk: Option<bool>,
    byte_fallback: Option<bool>,
    ignore_merges: Option<bool>,
    #[serde(borrow)]
    vocab: Option<VocabJson<'a>>,
    merges: Option<Merges>,
    max_input_chars_per_word: Option<usize>,
}

impl ModelJson<'_> {
    /// As tokenizers' BPE visitor: vocab and merges required, the options may be null.
    fn bpe(self) -> Option<BPE> {
        let mut b = BPE::builder().vocab_and_merges(self.vocab?.into_vocab(), self.merges?.0);
        if let Some(v) = self.dropout {
            b = b.dropout(v);
        }
        if let Some(v) = self.unk_token {
            b = b.unk_token(v);
        }
        if let Some(v) = self.continuing_subword_prefix {
            b = b.continuing_subword_prefix(v);
        }
        if let Some(v) = self.end_of_word_suffix {
            b = b.end_of_word_suffix(v);
        }
        if let Some(v) = self.fuse_unk {
            b = b.fuse_unk(v);
        }
        if let Some(v) = self.byte_fallback {
            b = b.byte_fallback(v);
        }
        if let Some(v) = self.ignore_merges {
            b = b.ignore_merges(v);
        }
        b.build().ok()
    }

    /// As tokenizers' WordPiece visitor: every field required, none null.
    fn wordpiece(self) -> Option<WordPiece> {
        WordPiece::builder()
            .vocab(self.vocab?.into_vocab())
            .unk_token(self.unk_token?)
            .continuing_subword_prefix(self.continuing_subword_prefix?)
            .max_input_chars_per_word(self.max_input_chars_per_word?)
            .build()
            .ok()
    }
}

/// The vocab as read (keys borrowed where unescaped), then moved into a map of the right size:
/// deserializing into the map directly grows it a dozen times.
struct VocabJson<'a>(Vec<(Cow<'a, str>, u32)>);

impl VocabJson<'_> {
    /// Later duplicates win, as when inserting in file order.
    fn into_vocab(self) -> Vocab {
        let mut v = Vocab::with_capacity(self.0.len());
        for (k, id) in self.0 {
            v.insert(k.into_owned(), id);
        }
        v
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for VocabJson<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = VocabJson<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of tokens to ids")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((k, id)) = map.next_entry::<Str<'a>, u32>()? {
                    out.push((k.0, id));
                }
                Ok(VocabJson(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

/// Merges in either form tokenizers accepts, all elements the same form: `["a", "b"]` pairs,
/// or legacy `"a b"` strings (split on the one space; lines starting `#version` skipped).
struct Merges(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Merges {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_seq(MergesVisitor)
    }
}

struct MergesVisitor;

impl<'de> Visitor<'de> for MergesVisitor {
    type Value = Merges;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of merges")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merges, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        let mut legacy = None;
        while let Some(m) = seq.next_element::<Merge<'de>>()? {
            let is_legacy = matches!(m, Merge::Line(_));
            if *legacy.get_or_insert(is_legacy) != is_legacy {
                return Err(de::Error::custom("merges mix strings and pairs"));
            }
            match m {
                Merge::Pair(a, b) => out.push((a.into_owned(), b.into_owned())),
                Merge::Line(l) if l.starts_with("#version") => {}
                Merge::Line(l) => {
                    let mut parts = l.split(' ');
                    match (parts.next(), parts.next(), parts.next()) {
                        (Some(a), Some(b), None) => out.push((a.to_owned(), b.to_owned())),
                        _ => return Err(de::Error::custom("a merge is not two tokens")),
                    }
                }
            }
        }
        Ok(Merges(out))
    }
}

enum Merge<'a> {
    Pair(Cow<'a, str>, Cow<'a, str>),
    Line(Cow<'a, str>),
}

impl<'de> Deserialize<'de> for Merge<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(MergeVisitor)
    }
}

struct MergeVisitor;

impl<'de> Visitor<'de> for MergeVisitor {
    type Value = Merge<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a merge: \"a b\" or [\"a\", \"b\"]")
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Merge<'de>, E> {
        Ok(Merge::Line(Cow::Borrowed(s)))
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Merge<'de>, E> {
        Ok(Merge::Line(Cow::Owned(s.to_owned())))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Merge<'de>, A::Error> {
        let a: Cow<'de, str> = seq
            .next_element::<Str<'de>>()?
            .ok_or_else(|| de::Error::invalid_length(0, &self))?
            .0;
        let b: Cow<'de, str> = seq
            .next_element::<Str<'de>>()?
            .ok_or_else(|| de::Error::invalid_length(1, &self))?
            .0;
        if seq.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(3, &self));
        }
        Ok(Merge::Pair(a, b))
    }
}

/// A string, borrowed from the input when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V(PhantomData))
    }
}
