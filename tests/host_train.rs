//! The host training pass (CPU f32, `model::backend::cpu`) against the candle pass it
//! replaces on the CPU, which `tests/gradients.rs` checks against finite differences:
//! log-probabilities and every LoRA gradient, with many adapters in one batch, a base-model
//! row, top-K targets, an LM-head LoRA, and the softmax kept or recomputed in backward. On
//! a tiny model the two passes agree to f32 rounding; on SmolLM2 both are held against the
//! candle pass in f64, and the host pass must be as exact as the candle pass in f32.
//! With `LORAPLEX_TEST_DEVICE=cuda` there is no host pass (it is CPU-only): the SmolLM2 test
//! then holds CUDA's f32 candle pass against its f64 one.

mod common;

use candle_core::DType;
use common::passes::{compare, Case};
use common::*;
use loraplex::lora::LoraWeights;
use loraplex::model::BaseModel;

#[test]
fn host_pass_equals_candle_pass_on_a_tiny_model() {
    for (family, model) in tiny_families(DType::F32) {
        eprintln!("{family}:");
        host_equals_candle(&model);
    }
}

fn host_equals_candle(model: &BaseModel) {
    let v = model.config.vocab_size;
    let ads: Vec<LoraWeights> = (0..3)
        .map(|i| random_adapter(model, 20 + i, 2 + i as usize, i == 1))
        .collect();
    let refs: Vec<&LoraWeights> = ads.iter().collect();
    // Interleaved adapters, a base-model row, top-2 targets, a one-token row.
    let case = Case::new(
        &[
            (7, 1, Some(2)),
            (3, 2, Some(0)),
            (5, 1, None),
            (9, 1, Some(1)),
            (1, 1, Some(0)),
            (6, 2, Some(1)),
        ],
        v,
        5,
    );
    for budget in [usize::MAX, 0] {
        let host = case.run(&model.with_probs_budget(budget), &refs);
        let reference = case.run(
            &model.with_candle_backend().with_probs_budget(budget),
            &refs,
        );
        let (lp_err, g_err) = compare(&host, &reference);
        assert!(
            lp_err < 1e-5,
            "budget {budget}: logprobs differ by {lp_err}"
        );
        assert!(
            g_err < 1e-4,
            "budget {budget}: gradients differ by {g_err} (relative)"
        );
    }
    // 782 tokens with the softmax recomputed. The host pass runs the rows as two parts side
    // by side, and in each part the LM head's first 256-token chunk ends inside adapter 1's
    // segment, so its LM-head LoRA runs on part of its rows in each chunk.
    let mut spec = vec![
        (64, 1, None),
        (64, 1, None),
        (30, 1, Some(0)),
        (20, 1, Some(2)),
    ];
    spec.extend([(60, 2, Some(1)); 2]);
    spec.extend([(60, 1, Some(1)); 8]);
    let long = Case::new(&spec, v, 7);
    let host = long.run(&model.with_probs_budget(0), &refs);
    let reference = long.run(&model.with_candle_backend().with_probs_budget(0), &refs);
    let (lp_err, g_err) = compare(&host, &reference);
    assert!(lp_err < 1e-5, "long rows: logprobs differ by {lp_err}");
    assert!(
        g_err < 1e-4,
        "long rows: gradients differ by {g_err} (relative)"
    );
}

#[test]
fn host_pass_on_smollm2_is_as_exact_as_the_candle_pass() {
    // The reference: the candle pass in f64 over the same (dequantized) weights.
    let model = smollm2();
    let exact_model =
        BaseModel::load(&model_path(), "smollm2-f64", &model.device, DType::F64).unwrap();
    let v = model.config.vocab_size;
    let ads: Vec<LoraWeights> = (0..2)
        .map(|i| random_adapter(model, 30 + i, 8, i == 0))
        .collect();
    let refs: Vec<&LoraWeights> = ads.iter().collect();
    // 134 tokens: enough for the host pass to run the rows as parts side by side.
    let case = Case::new(
        &[(64, 1, Some(1)), (40, 1, Some(0)), (30, 2, Some(1))],
        v,
        6,
    );
    let exact = case.run(&exact_model, &refs);
    let host = compare(&case.run(model, &refs), &exact);
    let candle = compare(&case.run(&model.with_candle_backend(), &refs), &exact);
    println!(
        "SmolLM2 in f32 against f64: host logprobs {:.2e}, gradients {:.2e} (relative); \
         candle {:.2e}, {:.2e}",
        host.0, host.1, candle.0, candle.1
    );
    assert!(host.0 < 1e-4, "host logprobs off by {}", host.0);
    assert!(host.1 < 3e-4, "host gradients off by {} (relative)", host.1);
    assert!(
        host.0 <= 2.0 * candle.0 && host.1 <= 2.0 * candle.1,
        "the host pass is less exact than the candle pass: {host:?} against {candle:?}"
    );
}
