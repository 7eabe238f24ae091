//! Plain-Rust helpers shared by the reference plugins: reading a request's
//! config, finding a datum's input tensors, and drawing a token from logits
//! with the host's random bits. It knows nothing of WIT: each plugin generates
//! its own bindings, and the macros below write the small conversions from
//! those generated types into these, once, at the plugin's call site.

use std::collections::BTreeMap;

/// One config value, as sent by the host.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Number(f64),
    Text(String),
}

/// A request's config (name → value).
#[derive(Debug, Clone, Default)]
pub struct Config(pub BTreeMap<String, Value>);

impl Config {
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Value)>) -> Self {
        Config(pairs.into_iter().collect())
    }

    /// A number, `default` when absent; an error when the key holds text or a
    /// non-finite number.
    pub fn number(&self, key: &str, default: f64) -> Result<f64, String> {
        match self.0.get(key) {
            None => Ok(default),
            Some(Value::Number(x)) if x.is_finite() => Ok(*x),
            Some(Value::Number(x)) => Err(format!("config `{key}` must be finite, got {x}")),
            Some(Value::Text(_)) => Err(format!("config `{key}` must be a number, got text")),
        }
    }

    /// A number if present.
    pub fn opt_number(&self, key: &str) -> Result<Option<f64>, String> {
        match self.0.get(key) {
            None => Ok(None),
            Some(_) => self.number(key, 0.0).map(Some),
        }
    }

    /// Text if present; an error when the key holds a number.
    pub fn text(&self, key: &str) -> Result<Option<&str>, String> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Text(s)) => Ok(Some(s)),
            Some(Value::Number(_)) => Err(format!("config `{key}` must be text, got a number")),
        }
    }
}

/// Finds the f32 input `name` of a datum and checks it has one value per token.
/// `inputs` yields (name, values or None when the dtype is not f32).
pub fn f32_input<'a>(
    inputs: impl IntoIterator<Item = (&'a str, Option<&'a [f32]>)>,
    name: &str,
    datum: usize,
    tokens: usize,
) -> Result<&'a [f32], String> {
    for (n, values) in inputs {
        if n == name {
            let values =
                values.ok_or_else(|| format!("datum {datum}: input `{name}` must be float32"))?;
            if values.len() != tokens {
                return Err(format!(
                    "datum {datum}: input `{name}` has {} values, logprobs has {tokens}",
                    values.len()
                ));
            }
            return Ok(values);
        }
    }
    Err(format!("datum {datum}: missing input `{name}`"))
}

/// 53 random bits as a uniform number in [0, 1).
pub fn uniform01(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Index of the largest logit among allowed tokens (lowest index on ties;
/// NaN never wins). A plain loop: this runs over the whole vocabulary at
/// every step.
pub fn argmax(logits: &[f32], allowed: impl Fn(usize) -> bool) -> Option<usize> {
    let mut best = None;
    let mut best_x = f32::NEG_INFINITY;
    for (i, &x) in logits.iter().enumerate() {
        if (x > best_x || (best.is_none() && x == best_x)) && allowed(i) {
            best = Some(i);
            best_x = x;
        }
    }
    best
}

/// Draws a token from softmax(logits / temperature) restricted to `allowed`,
/// inverting the CDF at `u` in [0, 1). Temperature 0 means greedy.
/// Returns None when no token is allowed.
pub fn draw(
    logits: &[f32],
    temperature: f64,
    allowed: impl Fn(usize) -> bool,
    u: f64,
) -> Option<usize> {
    let best = argmax(logits, &allowed)?;
    draw_given_best(logits, best, temperature, allowed, u)
}

/// [`draw`] when the caller already knows the allowed argmax `best`.
pub fn draw_given_best(
    logits: &[f32],
    best: usize,
    temperature: f64,
    allowed: impl Fn(usize) -> bool,
    u: f64,
) -> Option<usize> {
    let max = *logits.get(best)?;
    if temperature <= 0.0 || !max.is_finite() {
        return Some(best);
    }
    // One exp per allowed token: weights are kept for the CDF walk.
    let scale = (1.0 / temperature) as f32;
    let mut weights: Vec<(u32, f32)> = Vec::new();
    let mut total = 0.0f64;
    for (i, &x) in logits.iter().enumerate() {
        if x >= max - 100.0 * temperature as f32 && allowed(i) {
            let w = ((x - max) * scale).exp();
            total += w as f64;
            weights.push((i as u32, w));
        }
    }
    let target = u * total;
    let mut acc = 0.0f64;
    for &(i, w) in &weights {
        acc += w as f64;
        if acc > target {
            return Some(i as usize);
        }
    }
    // Rounding left `target` above the last partial sum.
    Some(weights.last().map_or(best, |&(i, _)| i as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draw_inverts_the_cdf() {
        let logits = [0.0f32, (3.0f32).ln()]; // probabilities 1/4, 3/4
        assert_eq!(draw(&logits, 1.0, |_| true, 0.2), Some(0));
        assert_eq!(draw(&logits, 1.0, |_| true, 0.3), Some(1));
        assert_eq!(draw(&logits, 0.0, |_| true, 0.0), Some(1));
        assert_eq!(draw(&logits, 1.0, |i| i == 0, 0.99), Some(0));
        assert_eq!(draw(&logits, 1.0, |_| false, 0.5), None);
        assert_eq!(argmax(&[f32::NAN, 1.0, 1.0], |_| true), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY; 2], |_| true), Some(0));
        assert_eq!(argmax(&[3.0, 2.0], |i| i == 1), Some(1));
    }
}

/// Defines `fn config(pairs: Vec<(String, ConfigValue)>) -> Config` in the
/// calling plugin, converting its generated `ConfigValue` (which must be in
/// scope) into a [`Config`].
#[macro_export]
macro_rules! wit_config {
    () => {
        fn config(pairs: Vec<(String, ConfigValue)>) -> $crate::Config {
            $crate::Config::from_pairs(pairs.into_iter().map(|(k, v)| {
                let v = match v {
                    ConfigValue::Number(x) => $crate::Value::Number(x),
                    ConfigValue::Text(s) => $crate::Value::Text(s),
                };
                (k, v)
            }))
        }
    };
}

/// Defines `fn f32s(d: &Datum) -> impl Iterator<Item = (&str, Option<&[f32]>)>`
/// in the calling loss plugin: each input tensor's name and, when it is
/// float32, its values (for [`f32_input`]). `Datum` and `TensorData` must be
/// in scope.
#[macro_export]
macro_rules! wit_f32_inputs {
    () => {
        fn f32s(d: &Datum) -> impl Iterator<Item = (&str, Option<&[f32]>)> {
            d.inputs.iter().map(|t| {
                let v = match &t.data {
                    TensorData::Float32(v) => Some(v.as_slice()),
                    TensorData::Int64(_) => None,
                };
                (t.name.as_str(), v)
            })
        }
    };
}
