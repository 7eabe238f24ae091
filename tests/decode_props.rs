//! Property tests of the protobuf decoders: for arbitrary bytes, shapes, indices and dtypes,
//! decoding a forward_backward request and densifying its tensors never panics, every
//! tensor it returns fits its bound, and no single allocation made while decoding is larger
//! than the bound or a small multiple of the input (a counting global allocator watches).

use loraplex::api::proto::{self, tensor};
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
