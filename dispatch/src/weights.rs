//! A function's resident tensors (issue 34, item 4): named tensors deployed with the function in a
//! safetensors file, uploaded to a device once per function version, and kept there while the
//! function exists.
//!
//! The host keeps the file's bytes ([`Weights`]); a device gets its copy ([`Resident`]) the first
//! time an invocation placed on it asks for a weight, and keeps it until the function version is
//! dropped: the catalog's copy, every shard's pre-linked copy and every invocation that holds a
//! weight's handle all keep the [`Weights`] alive, so nothing still reading a weight can see it
//! freed. The copy is owned by a session id of its own, so an invocation's `Release` never frees
//! it, and `Free` of a weight's handle only forgets the handle ([`crate::TensorInfo::borrowed`]).
//!
//! The copy counts once against the function's tenant's device-memory quota, per device it is on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::dispatcher::Dispatcher;
use crate::quota::TenantMemory;
use crate::record::{DType, MAX_RANK};
use crate::session::TensorInfo;
use crate::shape::{self, Dims};

/// The most tensors one function carries: a session holds at most as many handles by default
/// (`DispatchConfig::max_tensors_per_session`), and a guest needs a handle per weight it uses.
pub const MAX_WEIGHTS: usize = 1024;
/// The longest weight name, in bytes: a transformer's dotted paths
/// (`encoder.layers.11.attention.output.dense.weight`) fit several times over.
pub const MAX_NAME_BYTES: usize = 256;

/// One named tensor as deployed.
#[derive(Debug)]
pub struct Weight {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u32>,
    /// Its elements, little-endian, row-major: what the file held.
    pub data: Vec<u8>,
}

impl Weight {
    pub fn bytes(&self) -> u64 {
        self.data.len() as u64
    }
}

/// A device's copy of a function's weights, or the state of getting one.
enum Residency {
    Absent,
    /// An invocation is uploading them: others wait for it rather than upload a second copy.
    Loading,
    Ready(Arc<Resident>),
}

/// What an invocation is told when it asks for a device's copy.
pub enum Claim {
    /// On the device: adopt a handle.
    Ready(Arc<Resident>),
    /// Nobody has uploaded them: the caller does now, then [`Weights::loaded`] or drops the guard.
    Load(LoadGuard),
    /// Another invocation is uploading them: wait and ask again.
    Wait,
}

/// A function version's named tensors, by name.
pub struct Weights {
    tenant: u64,
    weights: Vec<Weight>,
    by_name: BTreeMap<String, usize>,
    total_bytes: u64,
    /// Indexed by device; grown on first use.
    devices: Mutex<Vec<Residency>>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights").field("tenant", &self.tenant).field("tensors", &self.weights.len()).finish()
    }
}

impl Weights {
    /// Reads a safetensors file: every tensor f32, f16, bf16 or i32, of rank 1 to 4 with no zero
    /// dimension and at most `max_elements` elements, at most [`MAX_WEIGHTS`] of them, names of
    /// at most [`MAX_NAME_BYTES`]. The message says what is wrong, for the deployer.
    pub fn parse(file: &[u8], tenant: u64, max_elements: u64) -> Result<Weights, String> {
        let parsed = safetensors::SafeTensors::deserialize(file).map_err(|e| format!("not a safetensors file: {e}"))?;
        let names = parsed.names();
        if names.is_empty() {
            return Err("the file holds no tensor".into());
        }
        if names.len() > MAX_WEIGHTS {
            return Err(format!("{} tensors; a function carries at most {MAX_WEIGHTS}", names.len()));
        }
        let mut weights = Vec::with_capacity(names.len());
        for (name, view) in parsed.iter() {
            if name.is_empty() || name.len() > MAX_NAME_BYTES {
                return Err(format!("a tensor name must be 1 to {MAX_NAME_BYTES} bytes"));
            }
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::F16 => DType::F16,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::I32 => DType::I32,
                other => return Err(format!("tensor {name:?}: dtype {other:?}; only F32, F16, BF16 and I32 run")),
            };
            let shape: Vec<u32> = view
                .shape()
                .iter()
                .map(|&d| u32::try_from(d).map_err(|_| format!("tensor {name:?}: dimension {d} is too large")))
                .collect::<Result<_, _>>()?;
            if shape.is_empty() || shape.len() > MAX_RANK {
                return Err(format!("tensor {name:?}: rank {}; tensors have 1 to {MAX_RANK} dimensions", shape.len()));
            }
            if shape.contains(&0) {
                return Err(format!("tensor {name:?}: a zero dimension"));
            }
            let elements = shape::elements(&shape).map_err(|_| format!("tensor {name:?}: too many elements"))?;
            if elements > max_elements {
                return Err(format!("tensor {name:?}: {elements} elements; a tensor has at most {max_elements}"));
            }
            // The crate checked that the data's length is the shape's times the dtype's size.
            debug_assert_eq!(view.data().len() as u64, elements * dtype.size());
            weights.push(Weight { name: name.to_string(), dtype, shape, data: view.data().to_vec() });
        }
        weights.sort_by(|a, b| a.name.cmp(&b.name));
        let by_name = weights.iter().enumerate().map(|(i, w)| (w.name.clone(), i)).collect();
        let total_bytes = weights.iter().map(Weight::bytes).sum();
        Ok(Weights { tenant, weights, by_name, total_bytes, devices: Mutex::new(Vec::new()) })
    }

    /// Every weight, by name.
    pub fn iter(&self) -> impl Iterator<Item = &Weight> {
        self.weights.iter()
    }

    /// The index of weight `name`, which [`Resident::info`] takes.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn tenant(&self) -> u64 {
        self.tenant
    }

    /// Device bytes of one copy: what each device's copy counts against the tenant's quota.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The copy on `device`, or the turn to upload it, or to wait for another's upload.
    pub fn claim(self: &Arc<Self>, device: usize) -> Claim {
        let mut devices = self.devices.lock().unwrap_or_else(|e| e.into_inner());
        if devices.len() <= device {
            devices.resize_with(device + 1, || Residency::Absent);
        }
        match &devices[device] {
            Residency::Ready(r) => Claim::Ready(r.clone()),
            Residency::Loading => Claim::Wait,
            Residency::Absent => {
                devices[device] = Residency::Loading;
                Claim::Load(LoadGuard { weights: self.clone(), device, done: false })
            }
        }
    }
}

/// The turn to upload a device's copy. Dropped without [`LoadGuard::loaded`] (the upload failed,
/// or its invocation ended first), it leaves the device without a copy, for the next invocation
/// to try.
pub struct LoadGuard {
    weights: Arc<Weights>,
    device: usize,
    done: bool,
}

impl LoadGuard {
    pub fn weights(&self) -> &Arc<Weights> {
        &self.weights
    }

    pub fn device(&self) -> usize {
        self.device
    }

    /// The upload finished: every later invocation on the device adopts `resident`.
    pub fn loaded(mut self, resident: Arc<Resident>) {
        debug_assert_eq!(resident.device, self.device);
        debug_assert_eq!(resident.infos.len(), self.weights.weights.len());
        let mut devices = self.weights.devices.lock().unwrap_or_else(|e| e.into_inner());
        devices[self.device] = Residency::Ready(resident);
        self.done = true;
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if !self.done {
            let mut devices = self.weights.devices.lock().unwrap_or_else(|e| e.into_inner());
            devices[self.device] = Residency::Absent;
        }
    }
}

/// One device's copy of a function's weights: their tensors, owned by session id `owner`. Dropped
/// with the last holder, it frees them and returns the tenant's quota.
pub struct Resident {
    dispatcher: Arc<Dispatcher>,
    /// The shard that uploads the copy: its release goes through that shard's ring, behind the
    /// uploads (`Dispatcher::release_from_anywhere`).
    shard: usize,
    device: usize,
    owner: u64,
    tenant: Arc<TenantMemory>,
    /// Quota held: the whole copy's, reserved before the first upload.
    held_bytes: u64,
    /// Tensors of the copy, in the order of `Weights::iter`: one per upload made so far.
    infos: Vec<TensorInfo>,
}

impl Resident {
    /// An empty copy on `device`, owned by a fresh session id of `shard`'s.
    pub fn new(dispatcher: Arc<Dispatcher>, shard: usize, device: usize, tenant: u64) -> Resident {
        let tenant = dispatcher.quotas.tenant(tenant);
        let owner = dispatcher.port(shard).next_id();
        Resident { dispatcher, shard, device, owner, tenant, held_bytes: 0, infos: Vec::new() }
    }

    pub fn device(&self) -> usize {
        self.device
    }

    /// The session id that owns the copy's tensors on the device.
    pub fn owner(&self) -> u64 {
        self.owner
    }

    /// Takes `bytes` of the tenant's quota for the next tensor, or `false` past it.
    pub fn reserve(&mut self, bytes: u64) -> bool {
        if !self.tenant.reserve(bytes, self.dispatcher.quotas.limit_bytes) {
            return false;
        }
        self.held_bytes += bytes;
        true
    }

    /// Records an uploaded tensor: `id` on the device, as `weight` describes it.
    pub fn push(&mut self, id: u64, weight: &Weight) -> Result<(), i32> {
        let Dims { dims, rank } = Dims::new(&weight.shape)?;
        let elements = shape::elements(&weight.shape)?;
        let info = TensorInfo { id, dims, rank, elements, dtype: weight.dtype, aliased: true, borrowed: true };
        self.infos.push(info);
        Ok(())
    }

    /// What a session needs to adopt weight `index` ([`Weights::index`]).
    pub fn info(&self, index: usize) -> Option<TensorInfo> {
        self.infos.get(index).copied()
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        // From whatever thread drops the last holder: the release goes through the uploading
        // shard's poller. None for a copy refused before its first upload: a guest asking again
        // and again past its quota sends nothing.
        if !self.infos.is_empty() {
            self.dispatcher.release_from_anywhere(self.shard, self.device, self.owner);
        }
        if self.held_bytes > 0 {
            self.tenant.release(self.held_bytes);
        }
    }
}
