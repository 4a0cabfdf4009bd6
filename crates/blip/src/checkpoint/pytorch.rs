//! `pytorch_model.bin` (PyTorch's zip of a pickled state dict) read tensor by tensor. The zip
//! stores tensor storages uncompressed, so each tensor is one read at a known offset: no zip
//! reader and checksum per tensor, and asking whether a weight exists costs nothing. (Not a
//! memory map: mapped pages would count in the process's memory on top of the loaded copy.)

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;

use candle_core::pickle::{read_pth_tensor_info, TensorInfo};
use candle_core::{bail, DType, Device, Error, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;

pub struct PyTorchWeights {
    file: Mutex<std::fs::File>,
    /// Tensor name → its description and the file offset of its storage.
    tensors: HashMap<String, (TensorInfo, usize)>,
}

impl PyTorchWeights {
    pub fn open(path: &Path) -> Result<Self> {
        let infos = read_pth_tensor_info(path, false, None)?;
        let file = std::fs::File::open(path)?;
        let mut zip = zip::ZipArchive::new(std::io::BufReader::new(&file)).map_err(Error::wrap)?;
        let mut storage_offsets: HashMap<String, usize> = HashMap::new();
        let mut tensors = HashMap::with_capacity(infos.len());
        for info in infos {
            let offset = match storage_offsets.get(&info.path) {
                Some(&offset) => offset,
                None => {
                    let entry = zip.by_name(&info.path).map_err(Error::wrap)?;
                    if entry.compression() != zip::CompressionMethod::Stored {
                        bail!("{}: compressed tensor storage is not supported", info.path);
                    }
                    let offset =
                        entry.data_start().ok_or_else(|| Error::Msg(format!("{}: no data offset", info.path)))?;
                    storage_offsets.insert(info.path.clone(), offset as usize);
                    offset as usize
                }
            };
            tensors.insert(info.name.clone(), (info, offset));
        }
        drop(zip);
        Ok(Self { file: Mutex::new(file), tensors })
    }

    fn load(&self, name: &str) -> Result<Tensor> {
        let Some((info, storage_offset)) = self.tensors.get(name) else {
            return Err(Error::CannotFindTensor { path: name.to_string() }.bt());
        };
        let (layout, elem_size) = (&info.layout, info.dtype.size_in_bytes());
        let mut bytes = vec![0u8; layout.shape().elem_count() * elem_size];
        {
            let mut file = self.file.lock().map_err(|_| Error::Msg("weights file lock poisoned".into()))?;
            file.seek(SeekFrom::Start((storage_offset + layout.start_offset() * elem_size) as u64))?;
            file.read_exact(&mut bytes).map_err(|e| Error::Msg(format!("{name}: {e} (truncated checkpoint?)")))?;
        }
        let bytes = bytes.as_slice();
        let dims = layout.dims();
        if layout.is_contiguous() {
            Tensor::from_raw_buffer(bytes, info.dtype, dims, &Device::Cpu)
        } else if layout.is_fortran_contiguous() {
            // Column-major storage: read with the dimensions reversed, then transpose back.
            let reversed: Vec<usize> = dims.iter().rev().copied().collect();
            let order: Vec<usize> = (0..dims.len()).rev().collect();
            Tensor::from_raw_buffer(bytes, info.dtype, &reversed, &Device::Cpu)?.permute(order)?.contiguous()
        } else {
            bail!("{name}: strided tensor storage is not supported")
        }
    }
}

impl SimpleBackend for PyTorchWeights {
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
