//! What this host offers the CUDA back-end, read without starting it: the driver and its version,
//! NVRTC and cuBLAS and theirs, and per visible device its name, compute capability, memory, and
//! whether the kernels compile for it. `tensor-wasm doctor` prints it; every probe loads a library
//! only after checking that it can be found, so a host without a GPU answers "no driver", never a
//! crash.

use cudarc::driver::CudaContext;

use crate::backend::cuda;

/// One visible device.
#[derive(Debug)]
pub struct DeviceProbe {
    pub ordinal: usize,
    pub name: Result<String, String>,
    /// (major, minor).
    pub compute_capability: Result<(i32, i32), String>,
    pub memory_bytes: Result<u64, String>,
    /// The back-end's kernels compiled by NVRTC for this device's SM and loaded.
    pub kernels: Result<(), String>,
}

/// The CUDA stack of this host, as far as it goes.
#[derive(Debug)]
pub struct CudaProbe {
    /// `cuDriverGetVersion`, as 12080 for 12.8.
    pub driver_version: Result<i32, String>,
    /// (major, minor).
    pub nvrtc_version: Result<(i32, i32), String>,
    /// (major, minor, patch).
    pub cublas_version: Result<(i32, i32, i32), String>,
    /// Every device the driver shows (`CUDA_VISIBLE_DEVICES` applies).
    pub devices: Result<Vec<DeviceProbe>, String>,
}

/// `None` when no NVIDIA driver library can be loaded: this host runs the host back-end.
pub fn cuda() -> Option<CudaProbe> {
    if !cuda::driver_present() {
        return None;
    }
    Some(CudaProbe {
        driver_version: driver_version(),
        nvrtc_version: nvrtc_version(),
        cublas_version: cublas_version(),
        devices: devices(),
    })
}

fn driver_version() -> Result<i32, String> {
    let mut version = 0;
    // SAFETY: the driver library is present (checked by the caller); one out-parameter.
    let result = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    match result {
        cudarc::driver::sys::CUresult::CUDA_SUCCESS => Ok(version),
        e => Err(format!("cuDriverGetVersion: {e:?}")),
    }
}

fn nvrtc_version() -> Result<(i32, i32), String> {
    // SAFETY: a probe that only tries to load the library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc was not found: install the CUDA toolkit's NVRTC".into());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; two out-parameters.
    let result = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    match result {
        cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS => Ok((major, minor)),
        e => Err(format!("nvrtcVersion: {e:?}")),
    }
}

fn cublas_version() -> Result<(i32, i32, i32), String> {
    use cudarc::cublas::sys::{cublasGetProperty, cublasStatus_t, libraryPropertyType_t as Property};
    // SAFETY: a probe that only tries to load the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("libcublas was not found: install the CUDA toolkit's cuBLAS".into());
    }
    let property = |which| {
        let mut value = 0;
        // SAFETY: the library is present; cublasGetProperty needs no handle.
        match unsafe { cublasGetProperty(which, &mut value) } {
            cublasStatus_t::CUBLAS_STATUS_SUCCESS => Ok(value),
            e => Err(format!("cublasGetProperty: {e:?}")),
        }
    };
    Ok((property(Property::MAJOR_VERSION)?, property(Property::MINOR_VERSION)?, property(Property::PATCH_LEVEL)?))
}

fn devices() -> Result<Vec<DeviceProbe>, String> {
    let count = CudaContext::device_count().map_err(|e| format!("cuInit or device count: {e}"))?;
    Ok((0..count.max(0) as usize).map(device).collect())
}

fn device(ordinal: usize) -> DeviceProbe {
    let ctx = match CudaContext::new(ordinal) {
        Ok(ctx) => ctx,
        Err(e) => {
            let e = format!("cannot open the device: {e}");
            return DeviceProbe {
                ordinal,
                name: Err(e.clone()),
                compute_capability: Err(e.clone()),
                memory_bytes: Err(e.clone()),
                kernels: Err(e),
            };
        }
    };
    DeviceProbe {
        ordinal,
        name: ctx.name().map_err(|e| e.to_string()),
        compute_capability: ctx.compute_capability().map_err(|e| e.to_string()),
        memory_bytes: ctx.total_mem().map(|b| b as u64).map_err(|e| e.to_string()),
        kernels: cuda::compile(&ctx).map(drop),
    }
}
