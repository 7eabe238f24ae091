//! `repetition-penalty`: the CTRL repetition penalty. Every token already in
//! the prompt or generated so far has its logit divided by `penalty` when
//! positive and multiplied by it when negative; then a token is drawn from
//! the softmax at `temperature` with the host's random bits.
//!
//! Config: `penalty` (default 1.2, > 0), `temperature` (default 1.0,
//! 0 = greedy), `max_tokens` (optional).
//!
//! Per-sequence state: which tokens were seen, updated from the newly
//! generated tokens at each step.

wit_bindgen::generate!({ world: "sampler-plugin", path: "../../wit" });

use std::cell::RefCell;

use exports::loraplex::plugin::sampler::{Choice, Guest, GuestSequence, Sequence};
use loraplex::plugin::types::ConfigValue;
use plugin_kit::{draw, uniform01};

struct RepetitionPenalty;

plugin_kit::wit_config!();

struct Seen {
    seen: Vec<bool>,
    /// How many of `generated` were already marked.
    consumed: usize,
}

struct PenaltySequence {
    penalty: f32,
    temperature: f64,
    max_tokens: Option<usize>,
    state: RefCell<Seen>,
}

impl Guest for RepetitionPenalty {
    type Sequence = PenaltySequence;
}

impl GuestSequence for PenaltySequence {
    fn create(
        prompt: Vec<u32>,
        cfg: Vec<(String, ConfigValue)>,
        vocab_size: u32,
    ) -> Result<Sequence, String> {
        let cfg = config(cfg);
        let penalty = cfg.number("penalty", 1.2)?;
        let temperature = cfg.number("temperature", 1.0)?;
        if penalty <= 0.0 {
            return Err(format!("penalty must be > 0, got {penalty}"));
        }
        if temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {temperature}"));
        }
        let max_tokens = cfg.opt_number("max_tokens")?.map(|x| x.max(0.0) as usize);
        let mut seen = vec![false; vocab_size as usize];
        for &t in &prompt {
            if let Some(s) = seen.get_mut(t as usize) {
                *s = true;
            }
        }
        Ok(Sequence::new(PenaltySequence {
            penalty: penalty as f32,
            temperature,
            max_tokens,
            state: RefCell::new(Seen { seen, consumed: 0 }),
        }))
    }

    fn step(
        &self,
        mut logits: Vec<f32>,
        generated: Vec<u32>,
        random: u64,
    ) -> Result<Choice, String> {
        if self.max_tokens.is_some_and(|m| generated.len() >= m) {
            return Ok(Choice::Stop);
        }
        let mut st = self.state.borrow_mut();
        let start = st.consumed.min(generated.len());
        for &t in &generated[start..] {
            if let Some(s) = st.seen.get_mut(t as usize) {
                *s = true;
            }
        }
        st.consumed = generated.len();
        for (l, &s) in logits.iter_mut().zip(st.seen.iter()) {
            if s {
                *l = if *l > 0.0 {
                    *l / self.penalty
                } else {
                    *l * self.penalty
                };
            }
        }
        let token = draw(&logits, self.temperature, |_| true, uniform01(random))
            .ok_or("no finite logit")?;
        Ok(Choice::Token(token as u32))
    }
}

export!(RepetitionPenalty);
