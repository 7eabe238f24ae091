//! Plain-Rust helpers shared by the reference plugins: reading a request's
//! config, finding a datum's input tensors, and drawing a token from logits
//! with the host's random bits. It knows nothing of WIT: each plugin converts
//! its generated types into these.

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

/// Index of the largest logit among allowed tokens (lowest index on ties).
pub fn argmax(logits: &[f32], allowed: impl Fn(usize) -> bool) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if !allowed(i) || x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map(|(i, _)| i)
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
    if temperature <= 0.0 || !logits[best].is_finite() {
        return Some(best);
    }
    let max = logits[best] as f64;
    let weight = |x: f32| ((x as f64 - max) / temperature).exp();
    let mut total = 0.0;
    for (i, &x) in logits.iter().enumerate() {
        if allowed(i) && !x.is_nan() {
            total += weight(x);
        }
    }
    let target = u * total;
    let mut acc = 0.0;
    let mut last = best;
    for (i, &x) in logits.iter().enumerate() {
        if allowed(i) && !x.is_nan() {
            acc += weight(x);
            last = i;
            if acc > target {
                return Some(i);
            }
        }
    }
    // Rounding left `target` above the last partial sum.
    Some(last)
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
    }
}
