//! `kl-is`: importance sampling with a KL penalty towards a reference model.
//! No built-in loss has this.
//!
//! Per token, with lp the learner's logprob, q the sampler's (`logprobs`
//! input), A the advantage (`advantages` input) and ρ the reference model's
//! logprob (`ref_logprobs` input):
//!
//!   r = exp(lp − q)                      importance ratio
//!   k = exp(ρ − lp) − (ρ − lp) − 1       the "k3" estimator of KL(learner ‖ ref), ≥ 0
//!   loss = Σ (−r·A + c·k)                summed over tokens and datums
//!   d loss / d lp = −r·A + c·(1 − exp(ρ − lp))
//!
//! with c from config `kl_coef` (default 0.1, must be ≥ 0).
//!
//! Metrics: `loss:sum`, `kl:sum` (Σ k), `tokens:sum`.

wit_bindgen::generate!({ world: "loss-plugin", path: "../../wit" });

use exports::loraplex::plugin::loss::{Datum, Guest, LossOutput};
use loraplex::plugin::types::{ConfigValue, TensorData};
use plugin_kit::f32_input;

const DEFAULT_KL_COEF: f64 = 0.1;

struct KlIs;

plugin_kit::wit_config!();

plugin_kit::wit_f32_inputs!();

impl Guest for KlIs {
    fn compute(
        data: Vec<Datum>,
        config_pairs: Vec<(String, ConfigValue)>,
    ) -> Result<LossOutput, String> {
        let c = config(config_pairs).number("kl_coef", DEFAULT_KL_COEF)?;
        if c < 0.0 {
            return Err(format!("kl_coef must be >= 0, got {c}"));
        }
        let mut loss = 0.0f64;
        let mut kl = 0.0f64;
        let mut tokens = 0.0f64;
        let mut grads = Vec::with_capacity(data.len());
        for (i, d) in data.iter().enumerate() {
            let n = d.logprobs.len();
            let q = f32_input(f32s(d), "logprobs", i, n)?;
            let adv = f32_input(f32s(d), "advantages", i, n)?;
            let rho = f32_input(f32s(d), "ref_logprobs", i, n)?;
            let mut g = Vec::with_capacity(n);
            for t in 0..n {
                let lp = d.logprobs[t] as f64;
                let a = adv[t] as f64;
                let r = (lp - q[t] as f64).exp();
                let delta = rho[t] as f64 - lp;
                let e = delta.exp();
                let k = e - delta - 1.0;
                loss += -r * a + c * k;
                kl += k;
                g.push((-r * a + c * (1.0 - e)) as f32);
            }
            tokens += n as f64;
            grads.push(g);
        }
        Ok(LossOutput {
            loss,
            grads,
            metrics: vec![
                ("loss:sum".into(), loss),
                ("kl:sum".into(), kl),
                ("tokens:sum".into(), tokens),
            ],
        })
    }
}

export!(KlIs);
