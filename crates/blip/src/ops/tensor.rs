//! Borrowing and comparing the values of CPU tensors.

use candle_core::{CpuStorage, Layout, Result, Storage, Tensor};

/// Whether two contiguous CPU tensors hold the same dtype, shape and bits (false for other
/// devices and for views that are not contiguous: it only spares a copy, never decides values).
pub(crate) fn same_bits(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dtype() != b.dtype() || a.shape() != b.shape() {
        return Ok(false);
    }
    let (a_storage, a_layout) = a.storage_and_layout();
    let (b_storage, b_layout) = b.storage_and_layout();
    let (Storage::Cpu(a_cpu), Storage::Cpu(b_cpu)) = (&*a_storage, &*b_storage) else {
        return Ok(false);
    };
    let (Some(a_range), Some(b_range)) = (a_layout.contiguous_offsets(), b_layout.contiguous_offsets()) else {
        return Ok(false);
    };
    fn bytes<T>(data: &[T], (start, end): (usize, usize)) -> &[u8] {
        let data = &data[start..end];
        // SAFETY: plain numbers (f32, bf16, f16: no padding, every bit initialized), read as the
        // bytes they occupy, for as long as the slice is borrowed.
        unsafe { std::slice::from_raw_parts(data.as_ptr().cast(), std::mem::size_of_val(data)) }
    }
    use CpuStorage::{BF16, F16, F32};
    Ok(match (a_cpu, b_cpu) {
        (F32(x), F32(y)) => bytes(x, a_range) == bytes(y, b_range),
        (BF16(x), BF16(y)) => bytes(x, a_range) == bytes(y, b_range),
        (F16(x), F16(y)) => bytes(x, a_range) == bytes(y, b_range),
        _ => false,
    })
}

/// The values of a contiguous CPU f32 tensor, borrowed.
pub(crate) fn f32_values<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(data)), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("expected a contiguous f32 CPU tensor"),
    }
}

/// The values of a contiguous CPU bf16 tensor, borrowed.
pub(crate) fn bf16_values<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [half::bf16]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::BF16(data)), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("expected a contiguous bf16 CPU tensor"),
    }
}

/// The values of contiguous CPU f32 storage, as a custom op's forward pass receives it; `op`
/// names the op in the error.
pub(crate) fn cpu_f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Ok(&data[start..end]),
        _ => candle_core::bail!("{op}: contiguous f32 CPU values expected"),
    }
}

/// Calls `f` with the values of each of `tensors` (f32 on the CPU, made contiguous first): what
/// a backward pass reads its inputs and gradient with.
pub(crate) fn with_f32_values<const N: usize, R>(tensors: [&Tensor; N], f: impl FnOnce([&[f32]; N]) -> R) -> Result<R> {
    let contiguous = tensors.map(Tensor::contiguous);
    let contiguous: Vec<Tensor> = contiguous.into_iter().collect::<Result<_>>()?;
    let guards: Vec<_> = contiguous.iter().map(Tensor::storage_and_layout).collect();
    let values: Vec<&[f32]> =
        guards.iter().map(|(storage, layout)| f32_values(storage, layout)).collect::<Result<_>>()?;
    let values: [&[f32]; N] = values.try_into().map_err(|_| candle_core::Error::Msg("tensor count".into()))?;
    Ok(f(values))
}

/// The transpose [cols, rows] of a CPU f32 matrix [rows, cols], contiguous, copied by blocks
/// of columns on all threads (candle's strided copy of `t()` goes element by element).
pub(crate) fn transposed_f32(matrix: &Tensor) -> Result<Tensor> {
    use rayon::prelude::*;
    /// Output rows (input columns) per task: each input row gives one contiguous read.
    const BLOCK: usize = 32;
    let (rows, cols) = matrix.dims2()?;
    let transposed = with_f32_values([matrix], |[values]| {
        let mut out = vec![0f32; rows * cols];
        if rows > 0 {
            out.par_chunks_mut(BLOCK * rows).enumerate().for_each(|(block, out)| {
                let (first, width) = (block * BLOCK, out.len() / rows);
                for (row, values) in values.chunks_exact(cols).enumerate() {
                    for (column, &value) in values[first..first + width].iter().enumerate() {
                        out[column * rows + row] = value;
                    }
                }
            });
        }
        out
    })?;
    Tensor::from_vec(transposed, (cols, rows), matrix.device())
}

#[cfg(test)]
mod tests {
    use candle_core::DType;

    use super::*;

    #[test]
    fn same_bits_tells_tied_copies_from_different_tensors() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(&[[1f32, 0.0], [2.5, -3.0]], &dev).unwrap();
        assert!(same_bits(&a, &a.copy().unwrap()).unwrap());
        let bf16 = a.to_dtype(DType::BF16).unwrap();
        assert!(same_bits(&bf16, &bf16.copy().unwrap()).unwrap());
        assert!(!same_bits(&a, &bf16).unwrap());
        // -0.0 == 0.0 as numbers, not as bits
        assert!(!same_bits(&a, &Tensor::new(&[[1f32, -0.0], [2.5, -3.0]], &dev).unwrap()).unwrap());
        assert!(!same_bits(&a, &a.reshape(4).unwrap()).unwrap());
        // views that are not contiguous are not compared
        assert!(!same_bits(&a.t().unwrap(), &a.t().unwrap().contiguous().unwrap()).unwrap());
    }

    #[test]
    fn transposed_f32_is_candles_transpose() {
        let dev = candle_core::Device::Cpu;
        for (rows, cols) in [(3, 70), (70, 3), (33, 65), (0, 4), (4, 0)] {
            let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let matrix = Tensor::from_vec(values, (rows, cols), &dev).unwrap();
            let ours = super::transposed_f32(&matrix).unwrap();
            let theirs = matrix.t().unwrap().contiguous().unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            assert!(same_bits(&ours, &theirs).unwrap(), "{rows}x{cols}");
        }
    }
}
