//! Property tests of the protobuf decoders: for arbitrary bytes, shapes, indices and dtypes,
//! decoding a forward_backward request and densifying its tensors never panics, every
//! tensor it returns fits its bound, and no single allocation made while decoding is larger
//! than the bound or a small multiple of the input (a counting global allocator watches).
//! Also provenance spans: arbitrary offsets, lengths and ids against a record never panic,
//! and what resolves tiles the datum and reads only what was recorded.

use loraplex::api::proto::{self, tensor};
use loraplex::api::tinker::provenance::{Provenance, RecordStore, SequenceRecord, Span, SpanKind};
use loraplex::api::tinker::training::{decode_data, tensor_in};
use proptest::prelude::*;
use prost::Message;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Records the largest allocation of the current thread while `WATCH` is on.
struct Largest;

thread_local! {
    static WATCH: Cell<bool> = const { Cell::new(false) };
    static MAX: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        note(n);
        System.realloc(p, l, n)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

fn note(n: usize) {
    let _ = WATCH.try_with(|w| {
        if w.get() {
            let _ = MAX.try_with(|m| m.set(m.get().max(n)));
        }
    });
}

#[global_allocator]
static A: Largest = Largest;

/// The largest allocation `f` made on this thread.
fn largest<T>(f: impl FnOnce() -> T) -> (T, usize) {
    MAX.with(|m| m.set(0));
    WATCH.with(|w| w.set(true));
    let out = f();
    WATCH.with(|w| w.set(false));
    (out, MAX.with(|m| m.get()))
}

fn dim() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..8,
        1 => Just(1i64 << 40),
        1 => Just(i64::MAX),
        1 => (1i64 << 20)..(1i64 << 62),
        1 => i64::MIN..0,
    ]
}

fn i64_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(0i64..10, 0..12).prop_map(|v| proto::write_i64(v)),
        prop::collection::vec(any::<i64>(), 0..6).prop_map(|v| proto::write_i64(v)),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

fn tensor_strategy() -> impl Strategy<Value = proto::Tensor> {
    let dense = prop::collection::vec(any::<u8>(), 0..96).prop_map(tensor::Encoding::Dense);
    let sparse = (
        i64_bytes(),
        i64_bytes(),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(crow_indices, col_indices, values)| {
            tensor::Encoding::SparseCsr(proto::SparseCsr {
                crow_indices,
                col_indices,
                values,
            })
        });
    (
        -1i32..8,
        prop::collection::vec(dim(), 0..6),
        prop::option::weighted(0.95, prop_oneof![dense, sparse]),
    )
        .prop_map(|(dtype, shape, encoding)| proto::Tensor {
            encoding,
            dtype,
            shape,
        })
}

fn input_bytes(t: &proto::Tensor) -> usize {
    t.encoded_len()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn densifying_never_panics_and_stays_within_its_bound(t in tensor_strategy(), max in 0usize..4096) {
        let (r, biggest) = largest(|| tensor_in("x", &t, max, "test bound"));
        let limit = (8 * max).max(4 * input_bytes(&t) + 1024);
        prop_assert!(biggest <= limit, "allocated {biggest} bytes; bound {limit}");
        if let Ok(out) = r {
            prop_assert!(out.len() <= max);
            let product: usize = out.shape.iter().product();
            prop_assert_eq!(product, out.len());
        }
    }

    #[test]
    fn requests_decode_within_their_bound(
        tensors in prop::collection::vec(tensor_strategy(), 0..4),
        tokens in prop::collection::vec(any::<i32>(), 0..16),
        max_cols in 0usize..64,
        max_values in 0usize..2048,
    ) {
        let data = vec![proto::Datum {
            model_input: vec![proto::Chunk {
                chunk: Some(proto::chunk::Chunk::EncodedText(proto::EncodedTextChunk {
                    tokens: proto::write_i32(tokens),
                })),
            }],
            loss_fn_inputs: tensors
                .into_iter()
                .enumerate()
                .map(|(i, t)| (format!("t{i}"), t))
                .collect(),
            ..Default::default()
        }];
        let req = proto::ForwardBackwardRequest { data, ..Default::default() };
        let bytes = req.encode_to_vec();
        let (r, biggest) = largest(|| {
            let decoded = proto::ForwardBackwardRequest::decode(bytes.as_slice()).ok()?;
            Some(decode_data(&decoded, max_cols, max_values))
        });
        let limit = (8 * max_values).max(4 * bytes.len() + 1024);
        prop_assert!(biggest <= limit, "allocated {biggest} bytes; bound {limit}");
        if let Some(Ok(data)) = r {
            let total: usize = data.iter().flat_map(|d| d.loss_fn_inputs.values()).map(|t| t.len()).sum();
            prop_assert!(total <= max_values);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let (r, biggest) = largest(|| {
            let decoded = proto::ForwardBackwardRequest::decode(bytes.as_slice()).ok()?;
            Some(decode_data(&decoded, 1024, 1 << 20))
        });
        let limit = (8 << 20usize).max(4 * bytes.len() + 1024);
        prop_assert!(biggest <= limit, "allocated {biggest} bytes; bound {limit}");
        drop(r);
    }
}

fn arb_span() -> impl Strategy<Value = Span> {
    (
        any::<bool>(),
        prop::sample::select(vec!["s-0", "s-0", "s-1", "s-1", "s-1", "nope"]),
        prop_oneof![12 => 0u64..3, 1 => Just(u64::MAX), 1 => Just(u64::MAX - 3)],
        prop_oneof![12 => 0u64..4, 1 => Just(u64::MAX)],
    )
        .prop_map(|(prompt, id, offset, length)| Span {
            kind: if prompt {
                SpanKind::Prompt
            } else {
                SpanKind::Sampled
            },
            sequence_id: id.into(),
            offset,
            length,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_spans_never_panic_and_resolve_only_what_was_recorded(
        model_input in prop::collection::vec(arb_span(), 1..4),
        target_spans in prop::collection::vec(arb_span(), 1..4),
        filler in prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(0u32..8, 1..4)],
        corrupt in prop::option::weighted(0.25, (any::<bool>(), 0usize..64)),
    ) {
        let records = [(vec![1u32, 2, 3, 4, 5, 6], vec![5u32, 6, 7, 1, 2]), (vec![1, 2, 3, 4], vec![0; 9])];
        let store = RecordStore::default();
        let scope = (loraplex::jobs::TenantId("t".into()), "s".to_owned());
        for (i, (p, t)) in records.iter().enumerate() {
            let rec = SequenceRecord {
                prompt: p.as_slice().into(),
                logprobs: t.iter().map(|&x| -1.0 - x as f32).collect(),
                tokens: t.clone(),
            };
            store.record(&scope, format!("s-{i}"), std::sync::Arc::new(rec));
        }
        // The tokens the spans claim, where they claim something that exists (so many cases
        // resolve), then arbitrary filler (so others do not tile).
        let claimed = |spans: &[Span]| -> Vec<u32> {
            let mut v = Vec::new();
            for sp in spans {
                let src = match sp.sequence_id.as_str() {
                    "s-0" => &records[0],
                    "s-1" => &records[1],
                    _ => continue,
                };
                let src = if sp.kind == SpanKind::Prompt { &src.0 } else { &src.1 };
                let (o, l) = (sp.offset as usize, sp.length as usize);
                if let Some(t) = o.checked_add(l).and_then(|e| src.get(o..e)) {
                    v.extend_from_slice(t);
                }
            }
            v
        };
        let mut input = claimed(&model_input);
        let mut targets = claimed(&target_spans);
        input.extend(&filler);
        if input.is_empty() || targets.is_empty() {
            return Ok(());
        }
        if let Some((which, at)) = corrupt {
            let v = if which { &mut input } else { &mut targets };
            let at = at % v.len();
            v[at] += 100;
        }
        let prov = Provenance { model_input, targets: target_spans };
        if let Ok((lp, sampled)) = store.resolve(&scope, "data[0]", &input, &targets, &prov) {
            prop_assert!(corrupt.is_none(), "a token that is not the recorded one resolved");
            let tiled = |spans: &[Span], n: usize| spans.iter().map(|s| s.length).sum::<u64>() == n as u64;
            prop_assert!(tiled(&prov.model_input, input.len()) && tiled(&prov.targets, targets.len()));
            prop_assert_eq!(lp.len(), targets.len());
            for (j, (&q, &m)) in lp.iter().zip(&sampled).enumerate() {
                // A sampled target's logprob is the recorded one of its token; others are 0.
                if m == 1.0 {
                    prop_assert_eq!(q, -1.0 - targets[j] as f32);
                } else {
                    prop_assert!(m == 0.0 && q == 0.0);
                }
            }
        }
    }
}

/// The request that used to abort the server: about 100 bytes, shape `[1, 2^40]`.
#[test]
fn the_reported_request_is_refused_with_small_allocations() {
    let t = proto::Tensor {
        encoding: Some(tensor::Encoding::SparseCsr(proto::SparseCsr {
            crow_indices: proto::write_i64([0, 0]),
            col_indices: Vec::new(),
            values: Vec::new(),
        })),
        dtype: proto::DType::Float32 as i32,
        shape: vec![1, 1 << 40],
    };
    let (r, biggest) = largest(|| tensor_in("weights", &t, 1024, "one token"));
    let e = r.expect_err("refused");
    assert!(e.to_string().contains("more than 1024 values"), "{e}");
    assert!(biggest < 4096, "allocated {biggest} bytes");
}
