//! Weight files read tensor by tensor with positioned reads: `model.safetensors`
//! (single or sharded) and `pytorch_model.bin` (PyTorch's zip of a pickled state dict, whose
//! storages are stored uncompressed). Not a memory map: mapped pages count in the process's
//! memory on top of the loaded copy, doubling peak memory while a model loads. Asking whether a
//! weight exists costs nothing.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::read_pth_tensor_info;
use candle_core::{bail, DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use rayon::prelude::*;
use serde::Deserialize;

/// Where one tensor's bytes are and how to read them.
struct TensorAt {
    file: usize,
    offset: u64,
    dtype: DType,
    dims: Vec<usize>,
    /// Stored column-major (a transposed tensor saved without copying).
    column_major: bool,
}

pub struct WeightReader {
    files: Vec<(PathBuf, std::fs::File)>,
    tensors: HashMap<String, TensorAt>,
}

/// One entry of a safetensors header.
#[derive(Deserialize)]
struct SafetensorsEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (u64, u64),
}

impl WeightReader {
    /// One or more safetensors files (the shards of one checkpoint).
    pub fn open_safetensors(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (index, path) in paths.iter().enumerate() {
            let mut file = std::fs::File::open(path)?;
            let file_len = file.metadata()?.len();
            let mut len = [0u8; 8];
            file.read_exact(&mut len)?;
            let header_len = u64::from_le_bytes(len);
            if header_len > file_len.saturating_sub(8) {
                bail!("{}: not a safetensors file (header length {header_len})", path.display());
            }
            let mut header = vec![0u8; header_len as usize];
            file.read_exact(&mut header)?;
            let mut entries: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
                .map_err(|e| Error::Msg(format!("{}: bad safetensors header: {e}", path.display())))?;
            entries.remove("__metadata__");
            let data_start = 8 + header_len;
            for (name, entry) in entries {
                let entry: SafetensorsEntry = serde_json::from_value(entry)
                    .map_err(|e| Error::Msg(format!("{}: bad header entry {name}: {e}", path.display())))?;
                let dtype = safetensors_dtype(&entry.dtype)
                    .ok_or_else(|| Error::Msg(format!("{name}: unsupported dtype {}", entry.dtype)))?;
                let (start, end) = entry.data_offsets;
                let expected = entry.shape.iter().product::<usize>() * dtype.size_in_bytes();
                if end < start || (end - start) as usize != expected || data_start + end > file_len {
                    bail!("{}: tensor {name} lies outside the file (truncated download?)", path.display());
                }
                let at =
                    TensorAt { file: index, offset: data_start + start, dtype, dims: entry.shape, column_major: false };
                tensors.insert(name, at);
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, tensors })
    }

    /// `pytorch_model.bin`: tensor descriptions from candle's pickle reader, storage offsets
    /// from the zip directory.
    pub fn open_pytorch(path: &Path) -> Result<Self> {
        let infos = read_pth_tensor_info(path, false, None)?;
        let file = std::fs::File::open(path)?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(&file)).map_err(Error::wrap)?;
        let mut storage_offsets: HashMap<String, u64> = HashMap::new();
        let mut tensors = HashMap::with_capacity(infos.len());
        for info in infos {
            let storage = match storage_offsets.get(&info.path) {
                Some(&offset) => offset,
                None => {
                    let entry = zip.by_name(&info.path).map_err(Error::wrap)?;
                    if entry.compression() != zip::CompressionMethod::Stored {
                        bail!("{}: compressed tensor storage is not supported", info.path);
                    }
                    let offset =
                        entry.data_start().ok_or_else(|| Error::Msg(format!("{}: no data offset", info.path)))?;
                    storage_offsets.insert(info.path.clone(), offset);
                    offset
                }
            };
            let layout = &info.layout;
            let column_major = !layout.is_contiguous();
            if column_major && !layout.is_fortran_contiguous() {
                bail!("{}: strided tensor storage is not supported", info.name);
            }
            let offset = storage + (layout.start_offset() * info.dtype.size_in_bytes()) as u64;
            let at = TensorAt { file: 0, offset, dtype: info.dtype, dims: layout.dims().to_vec(), column_major };
            tensors.insert(info.name.clone(), at);
        }
        drop(zip);
        Ok(Self { files: vec![(path.to_path_buf(), file)], tensors })
    }

    pub(crate) fn load(&self, name: &str) -> Result<Tensor> {
        let Some(at) = self.tensors.get(name) else {
            return Err(Error::CannotFindTensor { path: name.to_string() }.bt());
        };
        // Read with the dimensions reversed when column-major, then transpose back.
        let dims: Vec<usize> = if at.column_major { at.dims.iter().rev().copied().collect() } else { at.dims.clone() };
        // In 8 MB pieces on all threads: the copy out of the page cache and the first touch of
        // the tensor's fresh pages are most of a load's time.
        let read = |bytes: &mut [u8]| -> Result<()> {
            const PIECE: usize = 8 << 20;
            let (path, file) = &self.files[at.file];
            bytes
                .par_chunks_mut(PIECE)
                .enumerate()
                .try_for_each(|(i, piece)| read_exact_at(file, piece, at.offset + (i * PIECE) as u64))
                .map_err(|e| Error::Msg(format!("{}: {name}: {e} (truncated checkpoint?)", path.display())))
        };
        let count = at.dims.iter().product::<usize>();
        // Float weights are read straight into the tensor's buffer (no second copy).
        let tensor = match at.dtype {
            DType::F32 => Tensor::from_vec(read_into::<f32>(count, read)?, dims.as_slice(), &Device::Cpu)?,
            DType::F16 => Tensor::from_vec(read_into::<half::f16>(count, read)?, dims.as_slice(), &Device::Cpu)?,
            DType::BF16 => Tensor::from_vec(read_into::<half::bf16>(count, read)?, dims.as_slice(), &Device::Cpu)?,
            dtype => {
                let mut bytes = vec![0u8; count * dtype.size_in_bytes()];
                read(&mut bytes)?;
                Tensor::from_raw_buffer(&bytes, dtype, &dims, &Device::Cpu)?
            }
        };
        if at.column_major {
            let order: Vec<usize> = (0..dims.len()).rev().collect();
            tensor.permute(order)?.contiguous()
        } else {
            Ok(tensor)
        }
    }
}

/// Fills `buf` from `offset` without moving a shared cursor, so that threads can read at once.
#[cfg(unix)]
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &std::fs::File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        match std::os::windows::fs::FileExt::seek_read(file, buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// Marker for element types any bit pattern is a valid value of (the float formats).
trait AnyBits: Copy + Default {}
impl AnyBits for f32 {}
impl AnyBits for half::f16 {}
impl AnyBits for half::bf16 {}

/// `count` little-endian values read by `read` into a vector of `T` (x86 and ARM are
/// little-endian, as both file formats are).
fn read_into<T: AnyBits>(count: usize, read: impl FnOnce(&mut [u8]) -> Result<()>) -> Result<Vec<T>> {
    let mut values = vec![T::default(); count];
    // SAFETY: the byte view covers exactly the vector's initialized elements, and every bit
    // pattern is a valid T (AnyBits).
    let bytes =
        unsafe { std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), count * std::mem::size_of::<T>()) };
    read(bytes)?;
    Ok(values)
}

/// The candle dtype of a safetensors dtype name, for the ones candle holds.
fn safetensors_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "U32" => DType::U32,
        "U8" => DType::U8,
        _ => return None,
    })
}

impl WeightReader {
    /// Every tensor's name, sorted.
    pub(crate) fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

impl SimpleBackend for WeightReader {
    fn get(&self, shape: Shape, name: &str, _: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &shape {
            return Err(Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.load(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(path)
    }

    #[test]
    fn safetensors_tensors_equal_the_safetensors_crate() {
        let path = fixture("tiny-caption-st/model.safetensors");
        let reader = WeightReader::open_safetensors(std::slice::from_ref(&path)).unwrap();
        let reference = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(reader.tensors.len(), reference.len());
        for (name, tensor) in reference {
            let ours = reader.load(&name).unwrap();
            assert_eq!((ours.dtype(), ours.dims()), (tensor.dtype(), tensor.dims()), "{name}");
            let diff = (ours.to_dtype(DType::F32).unwrap() - tensor.to_dtype(DType::F32).unwrap()).unwrap();
            assert_eq!(diff.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn a_truncated_safetensors_file_is_refused_when_opened() {
        let bytes = std::fs::read(fixture("tiny-caption-st/model.safetensors")).unwrap();
        let cut = std::env::temp_dir().join(format!("blip-truncated-{}.safetensors", std::process::id()));
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let err = WeightReader::open_safetensors(std::slice::from_ref(&cut)).err().unwrap().to_string();
        std::fs::remove_file(&cut).unwrap();
        assert!(err.contains("truncated"), "{err}");
    }
}
