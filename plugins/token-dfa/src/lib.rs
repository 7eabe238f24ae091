//! `token-dfa`: constrained decoding. The output is restricted to the token
//! sequences accepted by a deterministic finite automaton over token ids,
//! given in the request's config; among the allowed tokens one is drawn from
//! the softmax at `temperature` with the host's random bits.
//!
//! Config:
//! - `dfa` (text, required): transitions `FROM TOKENS TO` separated by `;`,
//!   where TOKENS is a comma-separated list of ids or inclusive ranges `a-b`.
//!   State 0 is the start. Example, for "a number 1-999 without leading zero"
//!   when tokens 10..=19 are the digits 0..9:
//!   `0 11-19 1; 1 10-19 2; 2 10-19 3`.
//! - `accept` (text, required): comma-separated accepting states, e.g. `1,2,3`.
//! - `eos_token_id` (number, optional): in an accepting state this token may
//!   also be drawn; the sequence stops after it.
//! - `temperature` (default 1.0, 0 = greedy).
//!
//! The sequence stops (choice `stop`) in an accepting state with no way on.
//! Per-sequence state: the current DFA state, advanced over the tokens
//! generated since the previous step (a token the DFA does not allow there is
//! an error).

wit_bindgen::generate!({ world: "sampler-plugin", path: "../../wit" });

use std::cell::RefCell;

use exports::loraplex::plugin::sampler::{Choice, Guest, GuestSequence, Sequence};
use loraplex::plugin::types::ConfigValue;
use plugin_kit::{draw, uniform01};

const MAX_STATES: usize = 4096;

struct TokenDfa;

plugin_kit::wit_config!();

/// Inclusive token range → next state, per state.
type Transitions = Vec<Vec<(u32, u32, usize)>>;

fn parse_state(s: &str) -> Result<usize, String> {
    let n: usize = s.trim().parse().map_err(|_| format!("bad state `{s}`"))?;
    if n >= MAX_STATES {
        return Err(format!(
            "state {n} is above the limit of {MAX_STATES} states"
        ));
    }
    Ok(n)
}

fn parse_dfa(text: &str, vocab_size: u32) -> Result<Transitions, String> {
    let mut out: Transitions = Vec::new();
    for clause in text.split(';').map(str::trim).filter(|c| !c.is_empty()) {
        let parts: Vec<&str> = clause.split_whitespace().collect();
        let [from, tokens, to] = parts[..] else {
            return Err(format!("transition `{clause}` is not `FROM TOKENS TO`"));
        };
        let (from, to) = (parse_state(from)?, parse_state(to)?);
        if out.len() <= from.max(to) {
            out.resize_with(from.max(to) + 1, Vec::new);
        }
        for item in tokens.split(',') {
            let (lo, hi) = match item.split_once('-') {
                Some((a, b)) => (a, b),
                None => (item, item),
            };
            let parse = |s: &str| s.parse::<u32>().map_err(|_| format!("bad token id `{s}`"));
            let (lo, hi) = (parse(lo)?, parse(hi)?);
            if lo > hi || hi >= vocab_size {
                return Err(format!(
                    "token range {lo}-{hi} is empty or outside the vocabulary"
                ));
            }
            out[from].push((lo, hi, to));
        }
    }
    if out.is_empty() {
        return Err("dfa has no transitions".into());
    }
    Ok(out)
}

fn next_state(dfa: &Transitions, state: usize, token: u32) -> Option<usize> {
    dfa.get(state)?
        .iter()
        .find(|&&(lo, hi, _)| (lo..=hi).contains(&token))
        .map(|&(_, _, to)| to)
}

struct Progress {
    state: usize,
    consumed: usize,
    finished: bool,
}

struct DfaSequence {
    dfa: Transitions,
    accepting: Vec<bool>,
    eos: Option<u32>,
    temperature: f64,
    progress: RefCell<Progress>,
}

impl DfaSequence {
    fn accepts(&self, state: usize) -> bool {
        self.accepting.get(state).copied().unwrap_or(false)
    }
}

impl Guest for TokenDfa {
    type Sequence = DfaSequence;
}

impl GuestSequence for DfaSequence {
    fn create(
        _prompt: Vec<u32>,
        cfg: Vec<(String, ConfigValue)>,
        vocab_size: u32,
    ) -> Result<Sequence, String> {
        let cfg = config(cfg);
        let dfa = parse_dfa(
            cfg.text("dfa")?.ok_or("config `dfa` is required")?,
            vocab_size,
        )?;
        let mut accepting = vec![false; dfa.len()];
        for s in cfg
            .text("accept")?
            .ok_or("config `accept` is required")?
            .split(',')
        {
            let s = parse_state(s)?;
            if s >= accepting.len() {
                accepting.resize(s + 1, false);
            }
            accepting[s] = true;
        }
        let eos = match cfg.opt_number("eos_token_id")? {
            Some(x) if x >= 0.0 && x < vocab_size as f64 && x.fract() == 0.0 => Some(x as u32),
            Some(x) => return Err(format!("eos_token_id {x} is not a token id")),
            None => None,
        };
        let temperature = cfg.number("temperature", 1.0)?;
        if temperature < 0.0 {
            return Err(format!("temperature must be >= 0, got {temperature}"));
        }
        let progress = RefCell::new(Progress {
            state: 0,
            consumed: 0,
            finished: false,
        });
        Ok(Sequence::new(DfaSequence {
            dfa,
            accepting,
            eos,
            temperature,
            progress,
        }))
    }

    fn step(&self, logits: Vec<f32>, generated: Vec<u32>, random: u64) -> Result<Choice, String> {
        let mut p = self.progress.borrow_mut();
        if generated.len() < p.consumed {
            return Err("generated tokens went backwards".into());
        }
        for (i, &t) in generated.iter().enumerate().skip(p.consumed) {
            if p.finished {
                return Err(format!(
                    "token {t} at position {i} follows the end of sequence"
                ));
            }
            if self.eos == Some(t) && self.accepts(p.state) {
                p.finished = true;
                continue;
            }
            p.state = next_state(&self.dfa, p.state, t).ok_or_else(|| {
                format!(
                    "token {t} at position {i} is not allowed in state {}",
                    p.state
                )
            })?;
        }
        p.consumed = generated.len();
        if p.finished {
            return Ok(Choice::Stop);
        }
        let state = p.state;
        let eos_ok = self.accepts(state);
        let allowed = |i: usize| {
            let t = i as u32;
            (eos_ok && self.eos == Some(t)) || next_state(&self.dfa, state, t).is_some()
        };
        match draw(&logits, self.temperature, allowed, uniform01(random)) {
            Some(t) => Ok(Choice::Token(t as u32)),
            None if eos_ok => Ok(Choice::Stop),
            None => Err(format!("no token allowed in non-accepting state {state}")),
        }
    }
}

export!(TokenDfa);
