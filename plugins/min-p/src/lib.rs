//! `min-p`: min-p sampling. Keeps the tokens whose probability at the given
//! temperature is at least `min_p` times the most likely token's, then draws
//! from them with the host's random bits.
//!
//! Config: `min_p` (default 0.1, in [0, 1]), `temperature` (default 1.0,
//! 0 = greedy), `max_tokens` (optional: stop once that many were generated).

wit_bindgen::generate!({ world: "sampler-plugin", path: "../../wit" });

use exports::loraplex::plugin::sampler::{Choice, Guest, GuestSequence, Sequence};
use loraplex::plugin::types::ConfigValue;
use plugin_kit::{argmax, draw_given_best, uniform01};

struct MinP;

plugin_kit::wit_config!();

struct MinPSequence {
    min_p: f64,
    temperature: f64,
    max_tokens: Option<usize>,
}

impl Guest for MinP {
    type Sequence = MinPSequence;
}

impl GuestSequence for MinPSequence {
    fn create(
        _prompt: Vec<u32>,
        cfg: Vec<(String, ConfigValue)>,
        _vocab_size: u32,
    ) -> Result<Sequence, String> {
        let cfg = config(cfg);
        let min_p = cfg.number("min_p", 0.1)?;
        let temperature = cfg.number("temperature", 1.0)?;
        if !(0.0..=1.0).contains(&min_p) {
            return Err(format!("min_p must be in [0, 1], got {min_p}"));
        }
        if temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {temperature}"));
        }
        let max_tokens = cfg.opt_number("max_tokens")?.map(|x| x.max(0.0) as usize);
        Ok(Sequence::new(MinPSequence {
            min_p,
            temperature,
            max_tokens,
        }))
    }

    fn step(&self, logits: Vec<f32>, generated: Vec<u32>, random: u64) -> Result<Choice, String> {
        if self.max_tokens.is_some_and(|m| generated.len() >= m) {
            return Ok(Choice::Stop);
        }
        let best = argmax(&logits, |_| true).ok_or("no finite logit")?;
        // p_i >= min_p * p_max  <=>  l_i >= l_max + T * ln(min_p)
        let threshold = logits[best] as f64 + self.temperature * self.min_p.ln();
        let token = draw_given_best(
            &logits,
            best,
            self.temperature,
            |i| logits[i] as f64 >= threshold,
            uniform01(random),
        )
        .unwrap_or(best);
        Ok(Choice::Token(token as u32))
    }
}

export!(MinP);
