//! The shipped SmolLM2-135M-Instruct against an independent implementation: token ids,
//! chat rendering, logits at every position and greedy decoding from transformers on the
//! same GGUF (tests/reference/, made by make_reference.py). Then training on it.

mod common;

use candle_core::DType;
use common::*;
use loraplex::lora::optim::AdamParams;
use loraplex::lora::{LoraConfig, LoraWeights};
use loraplex::model::{BaseModel, InferRow, KvCache, Message, TrainRow};
use loraplex::sample::{generate, GenerateRequest, SamplingParams, StopReason};
use loraplex::train::loss::{BuiltinLoss, LossConfig, TensorIn};
use loraplex::train::{check_data, forward_backward, Datum, TrainableAdapter, Work};
use loraplex::Error;
use serde_json::Value;

fn reference() -> Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/reference/smollm2_reference.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).expect("reference json")).expect("parse")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn f(v: &Value) -> f32 {
    v.as_f64().expect("number") as f32
}

#[test]
fn tokenizer_matches_transformers() {
    let m = smollm2();
    let tok = m.tokenizer().unwrap();
    let r = reference();
    for case in r["tokenizer"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text).unwrap(),
            ids(&case["ids"]),
            "encoding {text:?}"
        );
    }
    for case in r["decode"].as_array().unwrap() {
        let got = tok.decode(&ids(&case["ids"]), false).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap());
        if let Some(skip) = case.get("text_skip_special_tokens") {
            assert_eq!(
                tok.decode(&ids(&case["ids"]), true).unwrap(),
                skip.as_str().unwrap()
            );
        }
    }
    assert_eq!(
        tok.bos_token_id,
        Some(r["special"]["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.eos_token_id,
        Some(r["special"]["eos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        m.config.vocab_size,
        r["special"]["vocab_size"].as_u64().unwrap() as usize
    );
}

#[test]
fn chat_template_renders_like_transformers() {
    let m = smollm2();
    let r = &reference()["special"];
    let msgs: Vec<Message> = serde_json::from_value(r["chat_messages"].clone()).unwrap();
    let tmpl = m.chat_template.as_ref().expect("template in GGUF metadata");
    assert_eq!(
        tmpl.render(&msgs, true).unwrap(),
        r["chat_rendered"].as_str().unwrap()
    );
    let tok = m.tokenizer().unwrap();
    assert_eq!(
        tok.encode(r["chat_rendered"].as_str().unwrap()).unwrap(),
        ids(&r["chat_rendered_ids"])
    );
    let with_reply: Vec<Message> =
        serde_json::from_value(r["chat_messages_with_reply"].clone()).unwrap();
    let text = tmpl.render(&with_reply, false).unwrap();
    assert_eq!(text, r["chat_rendered_with_reply"].as_str().unwrap());
    let rendered = tmpl.render_tokens(tok, &with_reply).unwrap();
    assert_eq!(rendered.tokens, tok.encode(&text).unwrap());
    let asst: Vec<u32> = rendered
        .tokens
        .iter()
        .zip(&rendered.assistant_mask)
        .filter(|(_, m)| **m)
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(
        tok.decode(&asst, false).unwrap(),
        "4<|im_end|>\n",
        "only the reply (and its end marker) is the assistant's"
    );
}

/// Logits at every position, decoded token by token through the KV cache.
fn decode_all_logits(m: &BaseModel, input: &[u32]) -> Vec<Vec<f32>> {
    let mut cache = KvCache::default();
    input
        .iter()
        .map(|t| {
            let row = [InferRow {
                tokens: std::slice::from_ref(t),
                adapter: None,
            }];
            let (l, _) = m
                .forward_infer(&row, &mut [&mut cache], &[], false)
                .unwrap();
            l.to_vec2::<f32>().unwrap().remove(0)
        })
        .collect()
}

#[test]
fn logits_match_transformers_at_every_position() {
    let m = smollm2();
    let r = &reference()["logits"];
    let input = ids(&r["input_ids"]);
    let probes = ids(&r["probe_ids"]);
    let rows = decode_all_logits(m, &input);
    let mut worst = 0f32;
    for pos in r["positions"].as_array().unwrap() {
        let t = pos["t"].as_u64().unwrap() as usize;
        let row = &rows[t];
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f32>().ln();
        let mut d = (lse - f(&pos["logsumexp"])).abs();
        for (id, want) in ids(&pos["top10_ids"])
            .iter()
            .zip(pos["top10_logits"].as_array().unwrap())
        {
            d = d.max((row[*id as usize] - f(want)).abs());
        }
        for (id, want) in probes.iter().zip(pos["probe_logits"].as_array().unwrap()) {
            d = d.max((row[*id as usize] - f(want)).abs());
        }
        let argmax = row
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0;
        assert_eq!(
            argmax as u64,
            pos["argmax"].as_u64().unwrap(),
            "argmax at {t}"
        );
        worst = worst.max(d);
    }
    eprintln!(
        "max |logit difference| vs transformers over {} positions: {worst:.2e}",
        rows.len()
    );
    assert!(worst < 1e-3, "logits differ from transformers by {worst}");

    // The training path (whole sequence at once, top-K targets) gives the same logprobs.
    let k = 10 + probes.len();
    let mut targets = Vec::new();
    for pos in r["positions"].as_array().unwrap() {
        targets.extend(ids(&pos["top10_ids"]));
        targets.extend(&probes);
    }
    let row = TrainRow {
        tokens: &input,
        targets: &targets,
        k,
        adapter: None,
    };
    let (lp, _) = m
        .forward_train(&m.train_batch(&[row]).unwrap(), &[], false)
        .unwrap();
    let mut worst = 0f32;
    for (t, pos) in r["positions"].as_array().unwrap().iter().enumerate() {
        let lse = f(&pos["logsumexp"]);
        let want: Vec<f32> = pos["top10_logits"]
            .as_array()
            .unwrap()
            .iter()
            .chain(pos["probe_logits"].as_array().unwrap())
            .map(|v| f(v) - lse)
            .collect();
        worst = worst.max(max_abs_diff(&lp[0][t * k..(t + 1) * k], &want));
    }
    assert!(worst < 1e-3, "training-path logprobs differ by {worst}");
    let nt: Vec<f32> = r["next_token_logprob"]
        .as_array()
        .unwrap()
        .iter()
        .map(f)
        .collect();
    let (_, plp) = m
        .forward_infer(
            &[InferRow {
                tokens: &input,
                adapter: None,
            }],
            &mut [&mut KvCache::default()],
            &[],
            true,
        )
        .unwrap();
    assert!(
        max_abs_diff(&plp.unwrap()[0], &nt) < 1e-3,
        "prompt logprobs"
    );
}

#[test]
fn greedy_generation_matches_transformers() {
    let m = smollm2();
    let r = &reference()["logits"];
    let input = ids(&r["input_ids"]);
    let want = ids(&r["greedy_ids"]);
    let params = SamplingParams {
        max_tokens: want.len(),
        temperature: 0.0,
        ..Default::default()
    };
    let reqs = [GenerateRequest {
        prompt: &input,
        adapter: None,
        params: params.clone(),
        ..Default::default()
    }];
    let out = generate(m, &[], &reqs).unwrap();
    assert_eq!(out[0].tokens, want);
    assert_eq!(out[0].stop_reason, StopReason::Length);
    // Batched with other sequences, and with a stop token: same tokens, cut after the stop.
    let stop = want[5];
    let mut p2 = params.clone();
    p2.stop_tokens = vec![stop];
    let other = m.tokenizer().unwrap().encode("Once upon a time").unwrap();
    let reqs = [
        GenerateRequest {
            prompt: &other,
            adapter: None,
            params: params.clone(),
            ..Default::default()
        },
        GenerateRequest {
            prompt: &input,
            adapter: None,
            params: p2,
            ..Default::default()
        },
    ];
    let out = generate(m, &[], &reqs).unwrap();
    let first_stop = want.iter().position(|t| *t == stop).unwrap();
    assert_eq!(
        out[1].tokens,
        want[..=first_stop],
        "a matched stop token is the last token returned"
    );
    assert_eq!(out[1].stop_reason, StopReason::Stop);
    let alone = generate(
        m,
        &[],
        &[GenerateRequest {
            prompt: &other,
            adapter: None,
            params,
            ..Default::default()
        }],
    )
    .unwrap();
    assert_eq!(
        out[0].tokens, alone[0].tokens,
        "batching does not change another sequence"
    );
}

#[test]
fn seeded_sampling_is_reproducible() {
    let m = smollm2();
    let prompt = m
        .tokenizer()
        .unwrap()
        .encode("The weather today is")
        .unwrap();
    let p = |seed| SamplingParams {
        max_tokens: 12,
        temperature: 1.0,
        top_p: 0.95,
        top_k: 50,
        seed: Some(seed),
        ..Default::default()
    };
    let run = |seed| {
        generate(
            m,
            &[],
            &[GenerateRequest {
                prompt: &prompt,
                adapter: None,
                params: p(seed),
                ..Default::default()
            }],
        )
        .unwrap()
        .remove(0)
    };
    let (a, b, c) = (run(1), run(1), run(2));
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.logprobs, b.logprobs);
    assert_ne!(
        a.tokens, c.tokens,
        "different seeds differ (12 tokens at T=1)"
    );
    assert!(a.logprobs.iter().all(|l| *l <= 0.0 && l.is_finite()));
}

#[test]
fn ten_cross_entropy_steps_bring_the_loss_down() {
    let m = smollm2();
    let tok = m.tokenizer().unwrap();
    let text = "loraplex trains many LoRA adapters on one shared base model. The zebra named Quillon sings in purple.";
    let toks = tok.encode(text).unwrap();
    let data = check_data(m, vec![Datum::next_token(&toks, 1)]).unwrap();
    let cfg = LoraConfig::from_tinker(8, 0, true, true, false).unwrap();
    let mut ad = TrainableAdapter::new(LoraWeights::init(&cfg, &m.config, &m.device).unwrap());
    let lc = LossConfig::new();
    let mut losses = Vec::new();
    for _ in 0..10 {
        let w = [&ad.weights];
        let work = [Work {
            adapter: Some(0),
            data: &data,
            loss: &BuiltinLoss::CrossEntropy,
            config: &lc,
        }];
        let (res, grads) = forward_backward(m, &w, &work, false).unwrap();
        let r = res.into_iter().next().unwrap().unwrap();
        losses.push(r.loss / toks.len() as f64);
        ad.accumulate(grads.into_iter().next().unwrap()).unwrap();
        ad.optim_step(&AdamParams {
            learning_rate: 1e-3,
            ..Default::default()
        })
        .unwrap();
    }
    eprintln!("per-token loss over 10 steps: {losses:.3?}");
    assert!(
        losses[9] < 0.5 * losses[0],
        "loss went from {} to {}",
        losses[0],
        losses[9]
    );
    assert!(
        losses.windows(2).filter(|w| w[1] < w[0]).count() >= 8,
        "mostly monotone: {losses:?}"
    );
}

#[test]
fn hugging_face_directory_loads_the_same_model() {
    let m = smollm2();
    let dir = std::env::temp_dir().join(format!("loraplex-hf-{}", std::process::id()));
    m.save_hf_dir(&dir).unwrap();
    let hf = BaseModel::load(&dir, "hf", &device(), DType::F32).unwrap();
    assert_eq!(hf.config, m.config);
    let tok = hf.tokenizer().unwrap();
    assert_eq!(
        tok.encode("Hello, world! 12345").unwrap(),
        m.tokenizer()
            .unwrap()
            .encode("Hello, world! 12345")
            .unwrap()
    );
    assert_eq!((tok.bos_token_id, tok.eos_token_id), (Some(1), Some(2)));
    let msgs = [Message {
        role: "user".into(),
        content: "hi".into(),
    }];
    assert_eq!(
        hf.chat_template
            .as_ref()
            .unwrap()
            .render(&msgs, true)
            .unwrap(),
        m.chat_template
            .as_ref()
            .unwrap()
            .render(&msgs, true)
            .unwrap()
    );
    let input: Vec<u32> = (100..140).collect();
    let a = decode_last(m, &input);
    let b = decode_last(&hf, &input);
    assert!(max_abs_diff(&a, &b) < 1e-5);
    std::fs::remove_dir_all(&dir).ok();
}

fn decode_last(m: &BaseModel, input: &[u32]) -> Vec<f32> {
    let (l, _) = m
        .forward_infer(
            &[InferRow {
                tokens: input,
                adapter: None,
            }],
            &mut [&mut KvCache::default()],
            &[],
            false,
        )
        .unwrap();
    l.to_vec2::<f32>().unwrap().remove(0)
}

#[test]
fn bad_input_is_a_typed_error_naming_the_field() {
    let m = smollm2();
    let expect = |r: loraplex::Result<()>, needle: &str| match r {
        Err(Error::InvalidInput { field, message }) => {
            assert!(
                format!("{field}: {message}").contains(needle),
                "{field}: {message} lacks {needle:?}"
            )
        }
        other => panic!("expected InvalidInput ({needle}), got {other:?}"),
    };
    // What the engine does with a request: check its data once, then run it.
    let fb = |data: Vec<Datum>, loss: &str| -> loraplex::Result<()> {
        let data = check_data(m, data)?;
        let loss = BuiltinLoss::parse(loss)?;
        let (res, _) = forward_backward(
            m,
            &[],
            &[Work {
                adapter: None,
                data: &data,
                loss: &loss,
                config: &LossConfig::new(),
            }],
            true,
        )?;
        res.into_iter().next().unwrap().map(|_| ())
    };
    expect(
        fb(vec![Datum::next_token(&[1, 2, 49152], 0)], "cross_entropy"),
        "outside the vocabulary",
    );
    expect(
        fb(vec![Datum::next_token(&[1, 49999, 3], 0)], "cross_entropy"),
        "data[0].model_input",
    );
    let mut d = Datum::next_token(&[1, 2, 3, 4], 0);
    d.loss_fn_inputs
        .insert("weights".into(), TensorIn::f32(vec![2], vec![1.0, 1.0]));
    expect(
        fb(vec![Datum::next_token(&[5, 6], 0), d], "cross_entropy"),
        "data[1].loss_fn_inputs.weights",
    );
    let empty = Datum {
        model_input: vec![],
        loss_fn_inputs: Default::default(),
    };
    expect(fb(vec![empty], "cross_entropy"), "empty");
    let long: Vec<u32> = vec![5; m.config.max_position_embeddings + 2];
    expect(
        fb(vec![Datum::next_token(&long, 0)], "cross_entropy"),
        "context length",
    );
    expect(
        fb(vec![Datum::next_token(&[1, 2, 3], 0)], "squared_error"),
        "unknown loss",
    );
    expect(fb(vec![Datum::next_token(&[1, 2, 3], 0)], "ppo"), "missing");
    // A request whose loss fails (ppo without its inputs) fails alone; a good one in the
    // same batch completes.
    let good = check_data(m, vec![Datum::next_token(&[1, 2, 3, 4], 0)]).unwrap();
    let bad = check_data(m, vec![Datum::next_token(&[1, 2, 3], 0)]).unwrap();
    let lc = LossConfig::new();
    let ppo = BuiltinLoss::parse("ppo").unwrap();
    let (res, _) = forward_backward(
        m,
        &[],
        &[
            Work {
                adapter: None,
                data: &bad,
                loss: &ppo,
                config: &lc,
            },
            Work {
                adapter: None,
                data: &good,
                loss: &BuiltinLoss::CrossEntropy,
                config: &lc,
            },
        ],
        true,
    )
    .unwrap();
    assert!(res[0].is_err() && res[1].is_ok());
    let p = SamplingParams {
        temperature: -1.0,
        ..Default::default()
    };
    assert!(matches!(
        generate(
            m,
            &[],
            &[GenerateRequest {
                prompt: &[1, 2],
                adapter: None,
                params: p,
                ..Default::default()
            }]
        ),
        Err(Error::InvalidInput { .. })
    ));
}
