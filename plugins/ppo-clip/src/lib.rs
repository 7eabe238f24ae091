//! `ppo-clip`: the clipped PPO objective, identical to loraplex's built-in
//! `ppo` loss.
//!
//! Per token, with lp the learner's logprob, q the sampler's (`logprobs`
//! input) and A the advantage (`advantages` input):
//! r = exp(lp − q), loss = −Σ min(r·A, clip(r, lo, hi)·A), summed over tokens
//! and datums. lo/hi come from config `clip_low_threshold` /
//! `clip_high_threshold` (defaults 0.8 / 1.2).
//! d loss / d lp = −r·A where the unclipped term is the minimum (ties
//! included), 0 where the clipped term is strictly smaller (then r is outside
//! [lo, hi] and the clipped term does not depend on lp).
//!
//! Metrics: `loss:sum`, `clipped_tokens:sum`, `tokens:sum`.

wit_bindgen::generate!({ world: "loss-plugin", path: "../../wit" });

use exports::loraplex::plugin::loss::{Datum, Guest, LossOutput};
use loraplex::plugin::types::{ConfigValue, TensorData};
use plugin_kit::f32_input;

struct PpoClip;

plugin_kit::wit_config!();

plugin_kit::wit_f32_inputs!();

impl Guest for PpoClip {
    fn compute(
        data: Vec<Datum>,
        config_pairs: Vec<(String, ConfigValue)>,
    ) -> Result<LossOutput, String> {
        let cfg = config(config_pairs);
        let lo = cfg.number("clip_low_threshold", 0.8)?;
        let hi = cfg.number("clip_high_threshold", 1.2)?;
        if lo > hi {
            return Err(format!(
                "clip_low_threshold {lo} is above clip_high_threshold {hi}"
            ));
        }
        let mut loss = 0.0f64;
        let mut clipped = 0.0f64;
        let mut tokens = 0.0f64;
        let mut grads = Vec::with_capacity(data.len());
        for (i, d) in data.iter().enumerate() {
            let n = d.logprobs.len();
            let q = f32_input(f32s(d), "logprobs", i, n)?;
            let adv = f32_input(f32s(d), "advantages", i, n)?;
            let mut g = Vec::with_capacity(n);
            for t in 0..n {
                let lp = d.logprobs[t] as f64;
                let a = adv[t] as f64;
                let r = (lp - q[t] as f64).exp();
                let unclipped = r * a;
                let clipped_term = r.clamp(lo, hi) * a;
                if unclipped <= clipped_term {
                    loss -= unclipped;
                    g.push((-r * a) as f32);
                } else {
                    loss -= clipped_term;
                    clipped += 1.0;
                    g.push(0.0);
                }
            }
            tokens += n as f64;
            grads.push(g);
        }
        Ok(LossOutput {
            loss,
            grads,
            metrics: vec![
                ("loss:sum".into(), loss),
                ("clipped_tokens:sum".into(), clipped),
                ("tokens:sum".into(), tokens),
            ],
        })
    }
}

export!(PpoClip);
