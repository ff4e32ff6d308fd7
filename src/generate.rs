//! Generation (contract §4): encode, check the length, prefill the prompt, then sample and
//! feed one token at a time until EOS, `max_tokens`, or the context is full; and the streamer
//! that turns tokens into text fragments as they come.

use crate::llama::{LlamaModel, LlamaState};
use crate::sampler::Sampler;
use crate::{Error, FinishReason, Generation, InferencingUsage, Result};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};

/// What generation needs from a causal language model (implemented by [`LlamaModel`]; a fake in
/// the tests exercises the loop without weights).
#[allow(dead_code)] // the full interface serves `generate_with`'s fake-model tests
pub(crate) trait CausalLm {
    type State;
    fn encode(&self, prompt: &str) -> Result<Vec<u32>>;
    fn decode(&self, ids: &[u32]) -> Result<String>;
    fn eos_ids(&self) -> &[u32];
    fn context_len(&self) -> usize;
    fn new_state(&self, capacity: usize) -> Self::State;
    fn forward<'s>(&self, state: &'s mut Self::State, tokens: &[u32]) -> Result<&'s [f32]>;
}

impl CausalLm for LlamaModel {
    type State = LlamaState;
    fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        LlamaModel::encode(self, prompt)
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        LlamaModel::decode(self, ids)
    }
    fn eos_ids(&self) -> &[u32] {
        LlamaModel::eos_ids(self)
    }
    fn context_len(&self) -> usize {
        LlamaModel::context_len(self)
    }
    fn new_state(&self, capacity: usize) -> LlamaState {
        LlamaModel::new_state(self, capacity)
    }
    fn forward<'s>(&self, state: &'s mut LlamaState, tokens: &[u32]) -> Result<&'s [f32]> {
        LlamaModel::forward(self, state, tokens)
    }
}

/// The prompt rules of contract §4, shared by the lone loop and the batch scheduler's callers:
/// something to generate from, and room in the context after the prompt.
pub(crate) fn check_prompt(n_prompt: usize, ctx: usize, model_name: &str) -> Result<()> {
    if n_prompt == 0 {
        return Err(Error::invalid(
            "the prompt is empty and this model's tokenizer adds no start token, so there is nothing to generate from",
        ));
    }
    if n_prompt >= ctx {
        return Err(Error::invalid(format!(
            "the prompt is {n_prompt} tokens long but model '{model_name}' has a context of {ctx} tokens; the prompt must be shorter than the context"
        )));
    }
    Ok(())
}

/// `Some((max_new, capacity))`: tokens to generate at most, and the KV positions that needs.
/// Prompt + generated never exceed the context; the last token sampled is never fed back, so
/// the cache needs one position less than that total. `None` when nothing is to run
/// (`max_tokens` 0, or cancelled before the start): see [`nothing_generated`].
pub(crate) fn plan(
    max_tokens: u32,
    ctx: usize,
    n_prompt: usize,
    cancelled: bool,
) -> Option<(usize, usize)> {
    if max_tokens == 0 || cancelled {
        return None;
    }
    let max_new = (max_tokens as usize).min(ctx - n_prompt);
    Some((max_new, (n_prompt + max_new - 1).max(n_prompt)))
}

/// The result when [`plan`] says nothing runs: empty text, the prompt's count, and why.
pub(crate) fn nothing_generated(max_tokens: u32, n_prompt: usize) -> Generation {
    Generation {
        text: String::new(),
        usage: InferencingUsage {
            prompt_token_count: n_prompt as u32,
            generated_token_count: 0,
        },
        finish: if max_tokens == 0 {
            FinishReason::Length
        } else {
            FinishReason::Cancelled
        },
    }
}

/// Receives text fragments as they are produced; `Break` stops the generation.
pub(crate) type OnText<'a> = &'a mut dyn FnMut(&str) -> ControlFlow<()>;

/// The lone generation loop (the engine runs requests through the batch scheduler, whose
/// caller side keeps these rules; this loop stays as their reference, tested on a fake model).
/// Encode, check the length, prefill the prompt in one batch, then sample
/// and feed one token at a time until EOS, `max_tokens`, the context is full, `on_text` says
/// stop, or `cancel` is set (checked before the prefill and before each step).
#[allow(dead_code)]
pub(crate) fn generate_with<M: CausalLm>(
    m: &M,
    model_name: &str,
    prompt: &str,
    max_tokens: u32,
    sampler: &mut Sampler,
    cancel: Option<&AtomicBool>,
    mut on_text: Option<OnText<'_>>,
) -> Result<Generation> {
    let prompt_ids = m.encode(prompt)?;
    let ctx = m.context_len();
    let n_prompt = prompt_ids.len();
    check_prompt(n_prompt, ctx, model_name)?;
    let usage = |generated: usize| InferencingUsage {
        prompt_token_count: n_prompt as u32,
        generated_token_count: generated as u32,
    };
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
    let Some((max_new, capacity)) = plan(max_tokens, ctx, n_prompt, cancelled()) else {
        return Ok(nothing_generated(max_tokens, n_prompt));
    };
    let mut state = m.new_state(capacity);

    // history = prompt + generated (the repeat penalty looks at both).
    let mut history = Vec::with_capacity(n_prompt + max_new);
    history.extend_from_slice(&prompt_ids);
    let eos = m.eos_ids();
    let mut streamer = on_text.as_ref().map(|_| Streamer::default());
    let mut generated = 0usize;

    let mut logits = m.forward(&mut state, &prompt_ids)?;
    if logits.is_empty() {
        return Err(Error::runtime(format!(
            "model '{model_name}' produced no logits (its vocabulary is empty)"
        )));
    }
    let finish = loop {
        let tok = sampler.sample(logits, &history);
        generated += 1;
        if eos.contains(&tok) {
            break FinishReason::Eos;
        }
        history.push(tok);
        if let (Some(s), Some(f)) = (streamer.as_mut(), on_text.as_mut()) {
            if s.step(m, &history[n_prompt..], &mut **f)?.is_break() {
                break FinishReason::Cancelled;
            }
        }
        if generated == max_new {
            break FinishReason::Length;
        }
        if cancelled() {
            break FinishReason::Cancelled;
        }
        logits = m.forward(&mut state, &[tok])?;
    };
    let text = m.decode(&history[n_prompt..])?;
    // A caller that said stop gets no more fragments.
    if finish != FinishReason::Cancelled {
        if let (Some(s), Some(f)) = (streamer.as_mut(), on_text.as_mut()) {
            s.finish(&text, &mut **f);
        }
    }
    Ok(Generation {
        text,
        usage: usage(generated),
        finish,
    })
}

/// Incremental detokenisation (the text-generation-inference scheme): decode a short window of
/// recent tokens with and without the newest ones and emit the difference, so each step costs a
/// few tokens' decode rather than the whole text. Two things make a decoded tail unstable, and
/// both are held back until settled:
/// - text ending in U+FFFD: an incomplete UTF-8 character (byte-level BPE);
/// - a trailing run of byte-fallback tokens (SentencePiece `<0xNN>`): the decoder turns the whole
///   run into U+FFFDs if it is not valid UTF-8 as a whole, so an `<0x17>` already shown as
///   "\x17" could turn into U+FFFD when an `<0xC3>` follows. A token that decodes alone to at
///   most one ASCII character or U+FFFD may be such a token; the run is settled by the next
///   token that is not (a single-character piece like "1" is held one step needlessly, which
///   costs nothing but latency).
#[derive(Default)]
pub(crate) struct Streamer {
    /// Start of the decode window (tokens before it are settled).
    prefix: usize,
    /// Tokens before `read` have been emitted.
    read: usize,
    /// The text emitted so far, to check the final text against.
    emitted: String,
}

impl Streamer {
    pub(crate) fn step<M: CausalLm>(
        &mut self,
        m: &M,
        gen: &[u32],
        f: OnText<'_>,
    ) -> Result<ControlFlow<()>> {
        let Some(&last) = gen.last() else {
            return Ok(ControlFlow::Continue(()));
        };
        let alone = m.decode(&[last])?;
        let mut chars = alone.chars();
        let maybe_byte = match (chars.next(), chars.next()) {
            (None, _) => true,
            (Some(c), None) => c.is_ascii() || c == '\u{FFFD}',
            _ => false,
        };
        if maybe_byte {
            return Ok(ControlFlow::Continue(()));
        }
        let before = m.decode(&gen[self.prefix..self.read])?;
        let now = m.decode(&gen[self.prefix..])?;
        if now.len() > before.len() && now.starts_with(&before) && !now.ends_with('\u{FFFD}') {
            let fresh = &now[before.len()..];
            self.emitted.push_str(fresh);
            self.prefix = self.read;
            self.read = gen.len();
            return Ok(f(fresh));
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Emits whatever the final text has beyond what was streamed (held-back tokens, a trailing
    /// incomplete character).
    pub(crate) fn finish(&mut self, text: &str, f: OnText<'_>) {
        debug_assert!(
            text.starts_with(&self.emitted),
            "streamed text is not a prefix"
        );
        if let Some(rest) = text.strip_prefix(self.emitted.as_str()) {
            if !rest.is_empty() {
                let _ = f(rest); // the last fragment: nothing is left to stop
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InferencingParams;

    /// A fake model with a SentencePiece-like vocabulary: ids 0..256 are byte-fallback tokens
    /// `<0xNN>`, 256 = BOS, 257 = EOS, 300.. are the multi-byte pieces of `PIECES`. Decoding
    /// follows tokenizers' ByteFallback (a run of byte tokens that is not valid UTF-8 as a whole
    /// becomes one U+FFFD per byte) or, with `byte_level`, lossy UTF-8 over all bytes (GPT-2
    /// style byte-level BPE). It "predicts" a fixed script: the logits put all mass on
    /// `script[pos - prompt_len]`.
    struct Fake {
        script: Vec<u32>,
        ctx: usize,
        add_bos: bool,
        byte_level: bool,
    }
    struct FakeState {
        pos: usize,
        prompt_len: usize,
        capacity: usize,
        logits: Vec<f32>,
    }
    const BOS: u32 = 256;
    const EOS: u32 = 257;
    const PIECES: &[&[u8]] = &[
        b"Hello",
        b" world",
        b"ab",
        b"cd",
        b" x",
        b"yz",
        b"\xE2",
        b"\x82\xAC!",
        b"\xF0\x9F",
        b"\xA6\x80z",
    ];
    fn piece(i: usize) -> u32 {
        300 + i as u32
    }

    impl Fake {
        fn new(script: Vec<u32>, ctx: usize) -> Fake {
            Fake {
                script,
                ctx,
                add_bos: true,
                byte_level: false,
            }
        }
    }

    impl CausalLm for Fake {
        type State = FakeState;
        fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
            let mut v: Vec<u32> = if self.add_bos { vec![BOS] } else { vec![] };
            v.extend(prompt.bytes().map(u32::from));
            Ok(v)
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            let bytes_of = |t: u32| -> &[u8] {
                match t {
                    0..=255 => &[],
                    256 | 257 => &[],
                    _ => PIECES[(t - 300) as usize],
                }
            };
            if self.byte_level {
                let mut b = Vec::new();
                for &t in ids {
                    if t < 256 {
                        b.push(t as u8);
                    } else {
                        b.extend_from_slice(bytes_of(t));
                    }
                }
                return Ok(String::from_utf8_lossy(&b).into_owned());
            }
            let mut out = String::new();
            let mut run: Vec<u8> = Vec::new();
            let flush = |run: &mut Vec<u8>, out: &mut String| {
                match std::str::from_utf8(run) {
                    Ok(s) => out.push_str(s),
                    Err(_) => run.iter().for_each(|_| out.push('\u{FFFD}')),
                }
                run.clear();
            };
            for &t in ids {
                if t < 256 {
                    run.push(t as u8);
                } else {
                    flush(&mut run, &mut out);
                    out.push_str(&String::from_utf8_lossy(bytes_of(t)));
                }
            }
            flush(&mut run, &mut out);
            Ok(out)
        }
        fn eos_ids(&self) -> &[u32] {
            &[EOS]
        }
        fn context_len(&self) -> usize {
            self.ctx
        }
        fn new_state(&self, capacity: usize) -> FakeState {
            FakeState {
                pos: 0,
                prompt_len: 0,
                capacity,
                logits: vec![0.0; 300 + PIECES.len()],
            }
        }
        fn forward<'s>(&self, st: &'s mut FakeState, tokens: &[u32]) -> Result<&'s [f32]> {
            if st.pos == 0 {
                st.prompt_len = tokens.len();
            }
            st.pos += tokens.len();
            assert!(st.pos <= st.capacity, "KV cache overflow");
            assert!(st.pos <= self.ctx, "past the context");
            let next = self
                .script
                .get(st.pos - st.prompt_len)
                .copied()
                .unwrap_or(b'.' as u32);
            st.logits.iter_mut().for_each(|l| *l = -10.0);
            st.logits[next as usize] = 10.0;
            Ok(&st.logits)
        }
    }

    fn greedy(max_tokens: u32) -> (InferencingParams, Sampler) {
        let p = InferencingParams {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        };
        (p, Sampler::new(&p, 0).unwrap())
    }

    fn script(s: &str, eos: bool) -> Vec<u32> {
        let mut v: Vec<u32> = s.bytes().map(u32::from).collect();
        if eos {
            v.push(EOS);
        }
        v
    }

    fn run(m: &Fake, prompt: &str, max: u32) -> Result<(Generation, Vec<String>)> {
        let (_, mut s) = greedy(max);
        let mut frags = Vec::new();
        let r = generate_with(
            m,
            "fake",
            prompt,
            max,
            &mut s,
            None,
            Some(&mut |t: &str| {
                frags.push(t.to_string());
                ControlFlow::Continue(())
            }),
        )?;
        Ok((r, frags))
    }

    #[test]
    fn finish_reasons() {
        let m = Fake::new(script("ab", true), 100);
        assert_eq!(run(&m, "x", 50).unwrap().0.finish, FinishReason::Eos);
        assert_eq!(run(&m, "x", 1).unwrap().0.finish, FinishReason::Length);
        assert_eq!(run(&m, "x", 0).unwrap().0.finish, FinishReason::Length);
        // Context full counts as length.
        let m = Fake::new(script("abcdefgh", false), 6);
        assert_eq!(run(&m, "ab", 100).unwrap().0.finish, FinishReason::Length);
    }

    #[test]
    fn callback_break_stops_at_once_and_flag_stops_before_the_next_step() {
        let m = Fake::new(vec![piece(0), piece(1), piece(2), piece(3), EOS], 100);
        let (_, mut s) = greedy(50);
        let mut frags = Vec::new();
        let r = generate_with(
            &m,
            "fake",
            "x",
            50,
            &mut s,
            None,
            Some(&mut |t: &str| {
                frags.push(t.to_string());
                if frags.len() == 2 {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }),
        )
        .unwrap();
        assert_eq!(frags, ["Hello", " world"]);
        assert_eq!(
            (r.text.as_str(), r.finish),
            ("Hello world", FinishReason::Cancelled)
        );
        assert_eq!(r.usage.generated_token_count, 2);

        // A flag set from the callback (as another thread would) stops after that token.
        let flag = AtomicBool::new(false);
        let (_, mut s) = greedy(50);
        let r = generate_with(
            &m,
            "fake",
            "x",
            50,
            &mut s,
            Some(&flag),
            Some(&mut |_: &str| {
                flag.store(true, Ordering::Relaxed);
                ControlFlow::Continue(())
            }),
        )
        .unwrap();
        assert_eq!(
            (r.text.as_str(), r.finish),
            ("Hello", FinishReason::Cancelled)
        );
        // Set before the start: nothing runs.
        let (_, mut s) = greedy(50);
        let r = generate_with(&m, "fake", "x", 50, &mut s, Some(&flag), None).unwrap();
        assert_eq!((r.text.as_str(), r.finish), ("", FinishReason::Cancelled));
        assert_eq!(r.usage.generated_token_count, 0);
    }

    #[test]
    fn stops_at_eos_which_counts_but_is_not_text() {
        let m = Fake::new(vec![piece(0), piece(1), b'!' as u32, EOS], 100);
        let (r, frags) = run(&m, "ab", 50).unwrap();
        assert_eq!(r.text, "Hello world!");
        assert_eq!(r.usage.prompt_token_count, 3); // <s> a b
        assert_eq!(r.usage.generated_token_count, 4); // Hello, " world", "!", </s>
                                                      // "!" may be a byte token: held until the end.
        assert_eq!(frags, ["Hello", " world", "!"]);
    }

    #[test]
    fn stops_at_max_tokens() {
        let m = Fake::new(script("hello world", true), 100);
        let (r, _) = run(&m, "x", 5).unwrap();
        assert_eq!(r.text, "hello");
        assert_eq!(r.usage.generated_token_count, 5);
    }

    #[test]
    fn stops_when_context_is_full() {
        // ctx 6, prompt <s> a b = 3 tokens: at most 3 generated (6 in all), cache never overflows.
        let m = Fake::new(script("abcdefgh", false), 6);
        let (r, frags) = run(&m, "ab", 100).unwrap();
        assert_eq!(r.text, "abc");
        assert_eq!(r.usage.generated_token_count, 3);
        assert_eq!(frags.concat(), "abc");
    }

    #[test]
    fn prompt_must_be_shorter_than_context() {
        let m = Fake::new(vec![], 4);
        // <s> + 3 bytes = 4 = context.
        match run(&m, "abc", 10) {
            Err(Error::InvalidInput(msg)) => assert_eq!(
                msg,
                "the prompt is 4 tokens long but model 'fake' has a context of 4 tokens; the prompt must be shorter than the context"
            ),
            other => panic!("{other:?}"),
        }
        // One shorter works and generates exactly one token.
        let m = Fake::new(script("z", false), 4);
        let (r, _) = run(&m, "ab", 10).unwrap();
        assert_eq!((r.text.as_str(), r.usage.generated_token_count), ("z", 1));
    }

    #[test]
    fn max_tokens_zero_returns_empty_text() {
        let m = Fake::new(script("abc", false), 100);
        let (r, frags) = run(&m, "hello", 0).unwrap();
        assert_eq!(r.text, "");
        assert_eq!(r.usage.generated_token_count, 0);
        assert_eq!(r.usage.prompt_token_count, 6);
        assert!(frags.is_empty());
    }

    #[test]
    fn empty_prompt_is_bos_only_or_an_error_without_bos() {
        let m = Fake::new(script("ok", true), 100);
        let (r, _) = run(&m, "", 10).unwrap();
        assert_eq!((r.text.as_str(), r.usage.prompt_token_count), ("ok", 1));
        let mut m = Fake::new(script("ok", true), 100);
        m.add_bos = false;
        assert!(matches!(run(&m, "", 10), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn streaming_holds_byte_fallback_runs_until_settled() {
        // "ab" <0xC3> <0xA9> "cd" <0x17> <0xC3> " x" "yz": the first run is "é"; the second is
        // not valid UTF-8 as a whole, so the decoder turns even the <0x17> into U+FFFD — it must
        // not have been streamed as "\x17" before <0xC3> arrived.
        let m = Fake::new(
            vec![
                piece(2),
                0xC3,
                0xA9,
                piece(3),
                0x17,
                0xC3,
                piece(4),
                piece(5),
                EOS,
            ],
            100,
        );
        let (r, frags) = run(&m, "", 100).unwrap();
        assert_eq!(r.text, "abécd\u{FFFD}\u{FFFD} xyz");
        assert_eq!(frags, ["ab", "écd", "\u{FFFD}\u{FFFD} x", "yz"]);
        // A valid run of ASCII bytes, then a piece.
        let m = Fake::new(vec![0x17, b'q' as u32, piece(5), EOS], 100);
        let (r, frags) = run(&m, "", 100).unwrap();
        assert_eq!(r.text, "\u{17}qyz");
        assert_eq!(frags, ["\u{17}qyz"]);
    }

    #[test]
    fn streaming_waits_for_complete_utf8_in_byte_level_vocabularies() {
        // Pieces split "€" (E2 | 82 AC) and "🦀" (F0 9F | A6 80).
        let mut m = Fake::new(
            vec![piece(0), piece(6), piece(7), piece(8), piece(9), EOS],
            100,
        );
        m.byte_level = true;
        let (r, frags) = run(&m, "", 100).unwrap();
        assert_eq!(r.text, "Hello€!🦀z");
        assert_eq!(frags, ["Hello", "€!", "🦀z"]);
    }

    #[test]
    fn trailing_incomplete_character_is_flushed_at_the_end() {
        // Generation stops (max_tokens) inside "€": the text holds U+FFFD, and the fragments
        // still concatenate to it.
        let mut m = Fake::new(vec![piece(0), piece(6), piece(7)], 100);
        m.byte_level = true;
        let (r, frags) = run(&m, "", 2).unwrap();
        assert_eq!(r.text, "Hello\u{FFFD}");
        assert_eq!(frags, ["Hello", "\u{FFFD}"]);
        // Byte-fallback: byte tokens "a" E2 82 form one invalid run: three U+FFFD (the "a" too).
        let m = Fake::new(script("a\u{20AC}", false), 100);
        let (r, frags) = run(&m, "", 3).unwrap();
        assert_eq!(r.text, "\u{FFFD}\u{FFFD}\u{FFFD}");
        assert_eq!(frags.concat(), r.text);
    }
}
