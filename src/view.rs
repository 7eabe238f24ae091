//! Read-only views of tensor storage on the host: [`HostView`] reads a contiguous CPU f32
//! tensor's contents in place, without a copy. A leaf module: the model's cpu backend and
//! the LoRA optimizer both read tensors through it, so neither imports the other for it.

use crate::error::{Error, Result};
use candle_core::{Storage, StorageRef, Tensor};

fn host_only() -> Error {
    Error::Tensor(candle_core::Error::Msg(
        "host kernel given a tensor that is not contiguous f32 on the CPU".into(),
    ))
}

/// The f32 contents of a contiguous CPU tensor, read in place (holds its storage's read
/// lock while alive).
pub struct HostView<'a> {
    storage: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> HostView<'a> {
    pub fn new(t: &'a Tensor) -> Result<Self> {
        let (storage, layout) = t.storage_and_layout();
        let (start, end) = layout.contiguous_offsets().ok_or_else(host_only)?;
        let view = HostView {
            storage,
            start,
            end,
        };
        view.try_slice()?;
        Ok(view)
    }

    fn try_slice(&self) -> Result<&[f32]> {
        match &*self.storage {
            Storage::Cpu(cpu) => Ok(&cpu.as_slice::<f32>()?[self.start..self.end]),
            _ => Err(host_only()),
        }
    }

    pub fn slice(&self) -> &[f32] {
        // Checked in `new`: CPU f32 storage with this range.
        self.try_slice().unwrap_or(&[])
    }
}
