//! Generation on one session, reusing what it has already processed: a
//! new prompt that extends the previous sequence (the next turn of a
//! chat) runs only its new tokens; one that diverges cuts the KV cache back
//! to the shared prefix (attention-only models). A linear-attention layer's
//! state folds every token in and cannot be cut back, so for models with
//! such layers the generator keeps [`SNAPSHOTS`] copies of it, taken just
//! before a turn's prompt ends and where its answer ends, and goes back to
//! the latest one inside the shared prefix (or starts over when none is).

use crate::grammar::{Matcher, Node};
use crate::template::END_OF_TURN;
use sluice_core::{Error, Result};
use sluice_engine::{Sampler, Session, Snapshot, TextStream, Tokenizer};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// How to sample and when to stop.
#[derive(Clone, Debug)]
pub struct GenParams {
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// 0: greedy.
    pub temperature: f32,
    /// Nucleus sampling mass.
    pub top_p: f32,
    /// Sampler seed.
    pub seed: u64,
    /// Texts that end the answer (not included in it).
    pub stop: Vec<String>,
    /// What the answer must be: only tokens that continue it are chosen,
    /// and the answer ends where it is complete.
    pub grammar: Option<Arc<Node>>,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            grammar: None,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-turn token or a stop text.
    Stop,
    /// `max_tokens`, or the context is full.
    Length,
    /// The caller stopped it (a client that went away).
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
        }
    }
}

/// One generation, measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The generated text (special tokens written out, stop text removed).
    pub text: String,
    /// Tokens of the prompt.
    pub prompt_tokens: usize,
    /// Of those, tokens whose KV cache was reused instead of recomputed.
    pub reused_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Seconds from the call to the first generated token.
    pub ttft_s: f64,
    /// Seconds of the tokens after the first.
    pub decode_s: f64,
    /// Why it ended.
    pub finish: Finish,
}

impl Outcome {
    /// Generated tokens per second after the first.
    pub fn tok_per_s(&self) -> f64 {
        self.completion_tokens.saturating_sub(1) as f64 / self.decode_s.max(1e-9)
    }
}

/// Snapshots of the linear layers' state a generator keeps (models with
/// such layers): before the last prompt's last token, and at the end of
/// the last answer. Their
/// bytes belong in the RAM budget (`StreamOptions::state_copies`).
pub const SNAPSHOTS: usize = 2;

/// A session, its tokenizer and what it has processed.
pub struct Generator {
    session: Session,
    tok: Tokenizer,
    stops: Vec<u32>,
    /// Tokens whose KV cache the session holds, in order.
    seen: Vec<u32>,
    /// Models with linear layers: states at earlier positions of `seen`,
    /// oldest first, at most [`SNAPSHOTS`].
    snaps: Vec<Snapshot>,
    /// Other conversations put aside whole, least recently used first.
    parked: Vec<Parked>,
    /// How many may be.
    max_parked: usize,
    ctx: usize,
    batch: usize,
    /// Each token's bytes, for constrained decoding (made when first
    /// needed).
    vocab: OnceLock<Vec<(Vec<u8>, bool)>>,
}

/// A conversation put aside: its tokens, its whole state and its
/// snapshots.
struct Parked {
    seen: Vec<u32>,
    state: Snapshot,
    snaps: Vec<Snapshot>,
}

/// Length of the common prefix.
fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Generator {
    /// A generator on `session` (with room for `ctx` tokens, prompts run
    /// in batches of up to `batch`): generation stops at the model's EOS ids
    /// and at any end-of-turn token of the known template families that the
    /// vocabulary has.
    pub fn new(
        session: Session,
        tok: Tokenizer,
        eos: &[u32],
        ctx: usize,
        batch: usize,
    ) -> Generator {
        let mut stops: Vec<u32> = eos.to_vec();
        stops.extend(END_OF_TURN.iter().filter_map(|t| tok.token_id(t)));
        stops.sort_unstable();
        stops.dedup();
        Generator {
            session,
            tok,
            stops,
            seen: Vec::new(),
            snaps: Vec::new(),
            parked: Vec::new(),
            max_parked: 0,
            ctx,
            batch: batch.max(1),
            vocab: OnceLock::new(),
        }
    }

    /// Keeps up to `n` other conversations whole (KV cache and all), so
    /// that requests of several clients taking turns each reuse their own
    /// prefix; their bytes belong in the RAM budget.
    pub fn with_parked(mut self, n: usize) -> Generator {
        self.max_parked = n;
        self
    }

    /// Conversations put aside, and their bytes.
    pub fn parked(&self) -> (usize, usize) {
        let b = self
            .parked
            .iter()
            .map(|p| p.state.bytes() + p.snaps.iter().map(Snapshot::bytes).sum::<usize>())
            .sum();
        (self.parked.len(), b)
    }

    /// Before `prompt` runs: the parked conversation that shares more of
    /// it than the current one is taken up, the current one put aside;
    /// a current one that `prompt` mostly leaves is put aside too.
    fn switch_for(&mut self, prompt: &[u32]) -> Result<()> {
        if self.max_parked == 0 {
            return Ok(());
        }
        let cur = common(&self.seen, prompt);
        let best = self
            .parked
            .iter()
            .enumerate()
            .map(|(i, p)| (i, common(&p.seen, prompt)))
            .filter(|&(_, n)| n > cur)
            .max_by_key(|&(_, n)| n);
        if let Some((i, _)) = best {
            let p = self.parked.remove(i);
            self.park_current();
            self.session.restore(&p.state)?;
            self.seen = p.seen;
            self.snaps = p.snaps;
        } else if cur * 2 < self.seen.len() {
            self.park_current();
        }
        Ok(())
    }

    /// Puts the current conversation aside (forgetting older copies of
    /// it, and the least recently used one when all places are taken).
    fn park_current(&mut self) {
        if self.seen.is_empty() {
            return;
        }
        // A state that cannot be read back is recomputed when it returns.
        let Ok(state) = self.session.park() else {
            return;
        };
        let seen = &self.seen;
        self.parked.retain(|p| !seen.starts_with(&p.seen));
        if self.parked.len() == self.max_parked {
            self.parked.remove(0);
        }
        self.parked.push(Parked {
            seen: self.seen.clone(),
            state,
            snaps: self.snaps.clone(),
        });
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// The session.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Tokens the context holds at most.
    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Forgets everything processed.
    pub fn reset(&mut self) {
        self.session.reset();
        self.seen.clear();
        self.snaps.clear();
    }

    /// Keeps the state at the current position (models with linear
    /// layers; attention alone is cut back without one).
    fn keep_snapshot(&mut self) {
        if self.session.can_truncate()
            || self
                .snaps
                .last()
                .is_some_and(|s| s.pos() == self.seen.len())
        {
            return;
        }
        // A state that cannot be read back is recomputed when needed.
        let Ok(snap) = self.session.snapshot() else {
            return;
        };
        if self.snaps.len() == SNAPSHOTS {
            self.snaps.remove(0);
        }
        self.snaps.push(snap);
    }

    /// Brings the session to `prompt` minus its last token, reusing what
    /// it holds; returns the reused count.
    fn rewind_to(&mut self, prompt: &[u32]) -> Result<usize> {
        // The last prompt token is always run, for its logits.
        let keep = common(&self.seen, prompt).min(prompt.len() - 1);
        if keep == self.seen.len() {
            return Ok(keep);
        }
        if keep > 0 && self.session.can_truncate() {
            self.session.truncate(keep)?;
            self.seen.truncate(keep);
            return Ok(keep);
        }
        // The latest state inside the shared prefix: what was computed up
        // to it is what the prompt needs.
        if let Some(i) = self
            .snaps
            .iter()
            .rposition(|s| s.pos() <= keep && s.pos() > 0)
        {
            self.snaps.truncate(i + 1);
            let s = &self.snaps[i];
            self.session.restore(s)?;
            self.seen.truncate(s.pos());
            return Ok(s.pos());
        }
        self.reset();
        Ok(0)
    }

    /// The token to take under a grammar, and the matcher after it: the
    /// sampler's choice among the tokens that continue `m` (the model's
    /// own first choices are tried first; when they all fail, every token
    /// that cannot continue is masked out and the choice made again).
    fn pick_constrained(
        &self,
        logits: &[f32],
        m: &Matcher,
        sampler: &mut Sampler,
        greedy: bool,
    ) -> Result<(u32, Matcher)> {
        let vocab = self.vocab.get_or_init(|| self.tok.token_bytes());
        let fits = |id: u32| -> Option<Matcher> {
            if self.stops.contains(&id) {
                return None;
            }
            let (bytes, special) = vocab.get(id as usize)?;
            m.feed(bytes, *special)
        };
        let choose = |l: &[f32], s: &mut Sampler| {
            if greedy {
                Sampler::argmax(l)
            } else {
                s.sample(l)
            }
        };
        let mut l = logits.to_vec();
        for _ in 0..8 {
            let id = choose(&l, sampler);
            if !l[id as usize].is_finite() {
                break;
            }
            if let Some(next) = fits(id) {
                return Ok((id, next));
            }
            l[id as usize] = f32::NEG_INFINITY;
        }
        let mut any = false;
        for (id, x) in l.iter_mut().enumerate() {
            if x.is_finite() && fits(id as u32).is_some() {
                any = true;
            } else {
                *x = f32::NEG_INFINITY;
            }
        }
        if !any {
            return Err(Error::Invalid(
                "no token of the vocabulary can continue the required output".into(),
            ));
        }
        let id = choose(&l, sampler);
        let next = fits(id).ok_or_else(|| Error::Invalid("constrained choice failed".into()))?;
        Ok((id, next))
    }

    /// Generates after `prompt`, calling `on_text` with each new piece of
    /// text; `on_text` returning false cancels.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        p: &GenParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Outcome> {
        if prompt.is_empty() {
            return Err(Error::Invalid("the prompt is empty".into()));
        }
        if prompt.len() >= self.ctx {
            return Err(Error::Invalid(format!(
                "the prompt is {} tokens; the context holds {} (raise --ctx)",
                prompt.len(),
                self.ctx
            )));
        }
        let t0 = Instant::now();
        self.switch_for(prompt)?;
        let reused = self.rewind_to(prompt)?;
        let fresh = &prompt[reused..];
        // Models with linear layers keep a snapshot just before the
        // prompt's last token: a later prompt that repeats this one goes
        // back there and runs that token again for its logits.
        let split = if self.session.can_truncate() {
            fresh.len()
        } else {
            fresh.len() - 1
        };
        let (head, tail) = fresh.split_at(split);
        let head_chunks = head.len().div_ceil(self.batch);
        let mut logits = Vec::new();
        for (i, chunk) in head
            .chunks(self.batch)
            .chain(tail.chunks(self.batch))
            .enumerate()
        {
            if i == head_chunks {
                self.keep_snapshot();
            }
            // A caller that went away during a long prompt stops it here
            // (an empty piece asks whether to go on).
            if !logits.is_empty() && !on_text("") {
                self.reset();
                return Ok(Outcome {
                    text: String::new(),
                    prompt_tokens: prompt.len(),
                    reused_tokens: reused,
                    completion_tokens: 0,
                    ttft_s: 0.0,
                    decode_s: 0.0,
                    finish: Finish::Cancelled,
                });
            }
            match self.session.forward(chunk, false) {
                Ok(l) => logits = l,
                Err(e) => {
                    // A failed step leaves the cache in an unknown state.
                    self.reset();
                    return Err(e);
                }
            }
            self.seen.extend_from_slice(chunk);
        }
        let mut sampler = Sampler::new(p.temperature, p.top_p, p.seed);
        let mut stream = TextStream::new();
        let mut text = String::new();
        // Text up to here has gone to `on_text`; what follows may be the
        // start of a stop text and is held until it cannot be.
        let mut sent = 0usize;
        let (mut n, mut ttft, mut t1) = (0usize, 0.0, t0);
        let room = self.ctx - prompt.len();
        let mut matcher = p.grammar.as_ref().map(Matcher::new);
        let finish = loop {
            if n >= p.max_tokens.min(room) {
                break Finish::Length;
            }
            let id = match &matcher {
                Some(m) => {
                    let (id, next) =
                        self.pick_constrained(&logits, m, &mut sampler, p.temperature <= 0.0)?;
                    matcher = Some(next);
                    id
                }
                None if p.temperature <= 0.0 => Sampler::argmax(&logits),
                None => sampler.sample(&logits),
            };
            n += 1;
            if n == 1 {
                ttft = t0.elapsed().as_secs_f64();
                t1 = Instant::now();
            }
            if self.stops.contains(&id) {
                break Finish::Stop;
            }
            let piece = stream.push(&self.tok, id)?;
            text.push_str(&piece);
            if let Some(at) = p
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(at);
                if at > sent && !on_text(&text[sent..]) {
                    break Finish::Cancelled;
                }
                sent = text.len();
                break Finish::Stop;
            }
            let hold = p
                .stop
                .iter()
                .map(|s| crate::tools::partial_suffix(&text, s))
                .max()
                .unwrap_or(0);
            let upto = text.len() - hold;
            if upto > sent {
                if !on_text(&text[sent..upto]) {
                    break Finish::Cancelled;
                }
                sent = upto;
            }
            if matcher.as_ref().is_some_and(Matcher::is_complete) {
                break Finish::Stop;
            }
            if n >= p.max_tokens.min(room) {
                break Finish::Length;
            }
            match self.session.forward(&[id], false) {
                Ok(l) => logits = l,
                Err(e) => {
                    self.reset();
                    return Err(e);
                }
            }
            self.seen.push(id);
        };
        if finish != Finish::Cancelled && text.len() > sent {
            // Held back for a stop text that never came.
            on_text(&text[sent..]);
        }
        self.keep_snapshot();
        Ok(Outcome {
            text,
            prompt_tokens: prompt.len(),
            reused_tokens: reused,
            completion_tokens: n,
            ttft_s: ttft,
            decode_s: if n > 1 {
                t1.elapsed().as_secs_f64()
            } else {
                0.0
            },
            finish,
        })
    }
}
