//! A deliberately misbehaving sampler plugin for the host's containment
//! tests. Config `mode` (text) picks the misbehaviour, which starts at step
//! `after` (number, default 0); before that, and in mode `ok`, it is greedy.

wit_bindgen::generate!({ world: "sampler-plugin", path: "../../../wit" });

use std::hint::black_box;

use exports::loraplex::plugin::sampler::{Choice, Guest, GuestSequence, Sequence};
use loraplex::plugin::types::ConfigValue;
use plugin_kit::argmax;

struct Hostile;

struct HostileSequence {
    mode: String,
    after: usize,
    vocab_size: u32,
}

impl Guest for Hostile {
    type Sequence = HostileSequence;
}

impl GuestSequence for HostileSequence {
    fn create(
        _prompt: Vec<u32>,
        config: Vec<(String, ConfigValue)>,
        vocab_size: u32,
    ) -> Result<Sequence, String> {
        let mut mode = "ok".to_string();
        let mut after = 0;
        for (k, v) in config {
            match (k.as_str(), v) {
                ("mode", ConfigValue::Text(s)) => mode = s,
                ("after", ConfigValue::Number(x)) => after = x as usize,
                _ => {}
            }
        }
        if mode == "fail-create" {
            return Err("refusing to start, on purpose".into());
        }
        Ok(Sequence::new(HostileSequence {
            mode,
            after,
            vocab_size,
        }))
    }

    fn step(&self, logits: Vec<f32>, generated: Vec<u32>, _random: u64) -> Result<Choice, String> {
        let greedy = argmax(&logits, |_| true).unwrap_or(0) as u32;
        if generated.len() < self.after {
            return Ok(Choice::Token(greedy));
        }
        match self.mode.as_str() {
            "ok" => Ok(Choice::Token(greedy)),
            "out-of-vocab" => Ok(Choice::Token(self.vocab_size)),
            "loop" => {
                let mut x = 0u64;
                loop {
                    x = x.wrapping_add(black_box(1));
                    black_box(x);
                }
            }
            "panic" => panic!("hostile sampler panicked on purpose"),
            "memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![black_box(1u8); 1 << 20]);
                    black_box(&hoard);
                }
            }
            other => Err(format!("unknown mode `{other}`")),
        }
    }
}

export!(Hostile);
