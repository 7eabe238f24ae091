//! `dro`: the DRO objective, identical to loraplex's built-in `dro` loss.
//!
//! Per token, with lp the learner's logprob, q the sampler's (`logprobs`
//! input) and A the advantage (`advantages` input):
//! loss = −Σ (lp·A − ½·β·(lp − q)²), summed over tokens and datums, with β
//! from config `beta` (default 0.05).
//! d loss / d lp = −A + β·(lp − q).
//!
//! Metrics: `loss:sum`, `tokens:sum`.

wit_bindgen::generate!({ world: "loss-plugin", path: "../../wit" });

use exports::loraplex::plugin::loss::{Datum, Guest, LossOutput};
use loraplex::plugin::types::{ConfigValue, TensorData};
use plugin_kit::f32_input;

/// Default β, the same as the built-in `dro`.
const DEFAULT_BETA: f64 = 0.05;

struct Dro;

plugin_kit::wit_config!();

plugin_kit::wit_f32_inputs!();

impl Guest for Dro {
    fn compute(
        data: Vec<Datum>,
        config_pairs: Vec<(String, ConfigValue)>,
    ) -> Result<LossOutput, String> {
        let beta = config(config_pairs).number("beta", DEFAULT_BETA)?;
        let mut loss = 0.0f64;
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
                let diff = lp - q[t] as f64;
                loss -= lp * a - 0.5 * beta * diff * diff;
                g.push((-a + beta * diff) as f32);
            }
            tokens += n as f64;
            grads.push(g);
        }
        Ok(LossOutput {
            loss,
            grads,
            metrics: vec![("loss:sum".into(), loss), ("tokens:sum".into(), tokens)],
        })
    }
}

export!(Dro);
