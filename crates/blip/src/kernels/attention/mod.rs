//! softmax(q·kᵀ·scale + bias)·v over f32 slices, one algorithm per use: the vision tower's
//! self-attention from its fused projection ([`vision`]), the decoder's cross-attention straight
//! from the encoder states ([`cross`]), and fused attention for a few queries ([`decode`]).

mod combine;
pub(crate) mod cross;
pub(crate) mod decode;
pub(crate) mod vision;

/// An output buffer that parallel tasks write at disjoint places.
struct SharedOut<T = f32>(*mut T);

impl<T> Clone for SharedOut<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// The element `offset` places from the start.
    ///
    /// # Safety
    /// `offset` must lie within the buffer.
    unsafe fn at(self, offset: usize) -> *mut T {
        // SAFETY: within the buffer, by the caller's contract.
        unsafe { self.0.add(offset) }
    }
}

// SAFETY: the pointer is only dereferenced by tasks that write disjoint elements (see the
// callers), while the buffer outlives them.
unsafe impl<T: Send> Send for SharedOut<T> {}
// SAFETY: as for Send: no two threads touch the same element.
unsafe impl<T: Send> Sync for SharedOut<T> {}
