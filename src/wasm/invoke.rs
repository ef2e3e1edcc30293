//! One invocation: a fresh store and instance from the function's `InstancePre`, run as a future
//! on the shard, with its deadline, memory cap and output cap, and its outcome classified.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::{Engine, InstancePre, Store, Trap, UpdateDeadline, Val, ValType};

use super::state::{stop, GuestState, GuestStop, InvokeLimits, TensorContext, WasiArgs};
use crate::error::ApiError;
use crate::runtime::event::{race, Either};

/// What to run.
#[derive(Debug)]
pub enum Entry {
    /// A WASI command: `_start`, with the request body as stdin.
    Start,
    /// A plain export called with numeric arguments.
    Export { name: String, args: Vec<serde_json::Value> },
}

#[derive(Debug)]
pub struct InvokeOutput {
    pub stdout: Vec<u8>,
    /// For `Entry::Export`: the results, as JSON numbers.
    pub results: Option<Vec<serde_json::Value>>,
}

/// An invocation's outcome, and its stderr (kept up to the cap) for the log, whatever the outcome.
pub struct Invocation {
    pub outcome: Result<InvokeOutput, ApiError>,
    pub stderr: Vec<u8>,
    pub stderr_dropped: usize,
    /// The spent store. Dropping it resets the instance's memory slot (the pages the guest
    /// dirtied), which a caller may leave until the answer has been sent.
    pub spent: Store<GuestState>,
}

/// Runs one invocation to completion on the current task. The guest yields to the shard's
/// executor every epoch tick, so other requests on the shard are served while it runs.
pub async fn invoke(
    engine: &Engine,
    pre: &InstancePre<GuestState>,
    wasi: Arc<WasiArgs>,
    stdin: Vec<u8>,
    entry: Entry,
    limits: InvokeLimits,
    tensors: Option<TensorContext>,
) -> Invocation {
    let deadline = Instant::now() + limits.timeout;
    let uses_tensors = tensors.is_some();
    // However the run ends (finished, failed, or its future dropped), the shard's guest turn moves
    // on at once rather than at the next park.
    let turn = crate::runtime::fair_yield::Turn::default();
    let _turn = TurnGuard(turn.clone());
    let mut state = GuestState::new(wasi, stdin, limits);
    state.deadline = deadline;
    state.turn = turn.clone();
    state.tensors = tensors.map(|mut t| {
        t.deadline = deadline;
        t
    });
    let mut store = Store::new(engine, state);
    store.limiter(|s| s);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            Ok(UpdateDeadline::Interrupt)
        } else if turn.within_slice(limits.slice / 2) {
            // A tick early in its slice (another shard's, or the first after it was let go):
            // it runs on to the next one.
            Ok(UpdateDeadline::Continue(1))
        } else {
            // Not `UpdateDeadline::Yield`: on monoio that starves the shard (see fair_yield).
            Ok(UpdateDeadline::YieldCustom(1, Box::pin(turn.yield_now())))
        }
    });

    let outcome = if uses_tensors {
        // The epoch deadline interrupts guest code, not a host call waiting on a kernel: a timer
        // bounds that wait. Dropping the run abandons the ticket; the session frees the tensors.
        let timer = monoio::time::sleep(deadline.saturating_duration_since(Instant::now()));
        let run_and_finish = async {
            let outcome = run(&mut store, pre, entry).await;
            // Kernels the guest streamed and never waited for: the invocation ends with them.
            if let Some(tensors) = store.data_mut().tensors.as_mut() {
                super::tensor::finish_streamed(tensors).await;
            }
            outcome
        };
        match race(run_and_finish, timer).await {
            Either::Left(outcome) => outcome,
            Either::Right(()) => Err(wasmtime::Error::new(Trap::Interrupt)),
        }
    } else {
        run(&mut store, pre, entry).await
    };
    let state = store.data_mut();
    // The tensors go now, with their quota: only the memory slot's reset waits.
    drop(state.tensors.take());
    let result = match outcome {
        Ok(results) => Ok(results),
        Err(err) => classify(err, state, &limits),
    };
    Invocation {
        outcome: result.map(|results| InvokeOutput { stdout: std::mem::take(&mut state.stdout), results }),
        stderr: std::mem::take(&mut state.stderr),
        stderr_dropped: state.stderr_dropped,
        spent: store,
    }
}

/// Where in a finished guest's memory [`release_memory`] starts: below it, wasmtime resets the
/// slot when the store is dropped, in place up to `linear_memory_keep_resident` (1 MiB of dirtied
/// pages with PAGEMAP_SCAN, the lowest 16 KiB without, see `engine::build_engine`) and with one
/// `madvise` for the rest, under a millisecond here.
const RELEASE_FROM_BYTES: usize = 1024 * 1024;
/// Memories no larger are left to wasmtime's reset alone: under 4 MiB its `madvise` holds the
/// shard for half a millisecond at worst, less than the steps and yields would cost.
const RELEASE_ABOVE_BYTES: usize = 4 * 1024 * 1024;
/// One step: 1 MiB of dirtied pages takes the kernel about 0.1 ms to give back (63 MiB took
/// 4.8 to 9 ms, perf/HOSTILE.md), a guest slice's worth.
const RELEASE_STEP_BYTES: usize = 1024 * 1024;

/// Gives back the pages a finished guest dirtied above the first MiB of its memory, a step at a
/// time, yielding the shard whenever it has worked half a guest slice, so that dropping the store
/// (wasmtime's reset of the slot: one `madvise` over everything the guest touched, which nothing
/// interrupts) finds them gone. A guest that filled its 64 MiB held its shard 5 to 9 ms at that
/// drop, and every other request on the shard waited (perf/HOSTILE.md). `MADV_DONTNEED` on the
/// slot's private mapping is what the reset does itself: anonymous pages read as zeros again, and
/// those of the copy-on-write image as the image.
///
/// Only for an invocation that yielded: one that ran less than a slice cannot have dirtied more
/// than a few hundred KiB (a page fault costs about a microsecond), and a guest whose memory is
/// large but barely touched would pay a `madvise` per MiB for nothing.
pub async fn release_memory(store: &mut Store<GuestState>) {
    if !store.data().turn.yielded() {
        return;
    }
    let Some(instance) = store.data().instance else { return };
    let memory = match store.data().memory {
        Some(memory) => memory,
        // Its memory under another name is still its memory (a module has at most one).
        None => match instance.get_memory(&mut *store, "memory").or_else(|| exported_memory(instance, store)) {
            Some(memory) => memory,
            None => return,
        },
    };
    let (base, size, slice) = (memory.data_ptr(&*store), memory.data_size(&*store), store.data().slice());
    if size <= RELEASE_ABOVE_BYTES {
        return;
    }
    let mut at = RELEASE_FROM_BYTES;
    let mut since = Instant::now();
    while at < size {
        let len = (size - at).min(RELEASE_STEP_BYTES);
        // SAFETY: [base + at, base + at + len) lies inside the guest's linear memory (`at` < `size`),
        // page-aligned (wasm pages are 64 KiB, the slot's base a page); no guest code runs on it
        // any more, and nothing of ours holds a reference into it. DONTNEED only drops pages.
        let done = unsafe { libc::madvise(base.add(at).cast(), len, libc::MADV_DONTNEED) };
        // Failing, it leaves the work to the slot's reset, as before.
        debug_assert_eq!(done, 0, "madvise: {}", std::io::Error::last_os_error());
        at += len;
        if since.elapsed() >= slice / 2 && at < size {
            crate::runtime::fair_yield::yield_now().await;
            since = Instant::now();
        }
    }
}

/// The memory an instance exports under whatever name.
fn exported_memory(instance: wasmtime::Instance, store: &mut Store<GuestState>) -> Option<wasmtime::Memory> {
    instance.exports(&mut *store).find_map(|export| export.into_memory())
}

/// Tells the invocation's turn that it is over when dropped (`fair_yield::Turn::done`).
struct TurnGuard(crate::runtime::fair_yield::Turn);

impl Drop for TurnGuard {
    fn drop(&mut self) {
        self.0.done();
    }
}

async fn run(
    store: &mut Store<GuestState>,
    pre: &InstancePre<GuestState>,
    entry: Entry,
) -> wasmtime::Result<Option<Vec<serde_json::Value>>> {
    let instance = pre.instantiate_async(&mut *store).await?;
    store.data_mut().instance = Some(instance);
    match entry {
        Entry::Start => {
            let start = instance.get_typed_func::<(), ()>(&mut *store, "_start")?;
            start.call_async(&mut *store, ()).await?;
            Ok(None)
        }
        Entry::Export { name, args } => {
            let func =
                instance.get_func(&mut *store, &name).ok_or_else(|| stop(GuestStop::ExportNotFound(name.clone())))?;
            let ty = func.ty(&*store);
            let params = ty.params().collect::<Vec<_>>();
            if params.len() != args.len() {
                return Err(stop(GuestStop::ExportArgs(format!(
                    "`{name}` takes {} arguments, got {}",
                    params.len(),
                    args.len()
                ))));
            }
            let params = params
                .iter()
                .zip(&args)
                .enumerate()
                .map(|(i, (ty, v))| {
                    json_to_val(ty, v)
                        .ok_or_else(|| stop(GuestStop::ExportArgs(format!("argument {i} is not a valid {ty}"))))
                })
                .collect::<wasmtime::Result<Vec<_>>>()?;
            let mut results = vec![Val::I32(0); ty.results().len()];
            func.call_async(&mut *store, &params, &mut results).await?;
            results
                .iter()
                .map(|v| val_to_json(v).ok_or_else(|| stop(GuestStop::ExportArgs("a result is not a number".into()))))
                .collect::<wasmtime::Result<Vec<_>>>()
                .map(Some)
        }
    }
}

fn json_to_val(ty: &ValType, v: &serde_json::Value) -> Option<Val> {
    Some(match ty {
        ValType::I32 => Val::I32(
            i32::try_from(v.as_i64()?)
                .ok()
                .or_else(|| v.as_u64().and_then(|u| u32::try_from(u).ok()).map(|u| u as i32))?,
        ),
        ValType::I64 => Val::I64(v.as_i64().or_else(|| v.as_u64().map(|u| u as i64))?),
        ValType::F32 => Val::F32((v.as_f64()? as f32).to_bits()),
        ValType::F64 => Val::F64(v.as_f64()?.to_bits()),
        _ => return None,
    })
}

fn val_to_json(v: &Val) -> Option<serde_json::Value> {
    Some(match v {
        Val::I32(x) => (*x).into(),
        Val::I64(x) => (*x).into(),
        Val::F32(bits) => serde_json::Number::from_f64(f32::from_bits(*bits) as f64)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Val::F64(bits) => serde_json::Number::from_f64(f64::from_bits(*bits))
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        _ => return None,
    })
}

/// Maps a failed run to what the caller is told. A `proc_exit(0)` is a success.
fn classify(
    err: wasmtime::Error,
    state: &GuestState,
    limits: &InvokeLimits,
) -> Result<Option<Vec<serde_json::Value>>, ApiError> {
    // A memory or output cap may surface as a trap inside the guest: the flags are the truth.
    if state.memory_exceeded {
        return Err(ApiError::MemoryLimitExceeded { limit_mb: limits.memory_limit_mb });
    }
    if state.output_exceeded {
        return Err(ApiError::OutputTooLarge { limit: limits.max_output_bytes });
    }
    // A host function's `bug!`: 500 `internal`, not the guest's fault.
    if let Some(ApiError::Bug(what)) = err.downcast_ref::<ApiError>() {
        return Err(ApiError::Bug(what));
    }
    match err.downcast_ref::<GuestStop>() {
        Some(GuestStop::Exit(0)) => return Ok(None),
        Some(GuestStop::Exit(code)) => return Err(ApiError::GuestExit { code: *code }),
        Some(GuestStop::ExportNotFound(n)) => return Err(ApiError::ExportNotFound(n.clone())),
        Some(GuestStop::ExportArgs(m)) => return Err(ApiError::InvalidInvokeRequest(m.clone())),
        Some(GuestStop::OutputCap | GuestStop::MemoryCap) | None => {}
    }
    match err.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Err(ApiError::InvokeTimeout { timeout_ms: limits.timeout.as_millis() as u64 }),
        Some(Trap::StackOverflow) => Err(ApiError::GuestTrap("stack overflow: the call stack was exhausted".into())),
        Some(trap) => Err(ApiError::GuestTrap(trap.to_string())),
        None => Err(ApiError::GuestTrap(format!("{err}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bug_in_a_host_function_is_a_500_not_a_guest_trap() {
        let limits = InvokeLimits {
            timeout: Duration::from_secs(1),
            memory_limit_mb: 1,
            max_output_bytes: 1,
            max_stderr_bytes: 1,
            slice: Duration::from_millis(1),
            max_table_elements: 1,
        };
        let state = GuestState::new(Arc::default(), Vec::new(), limits);
        // What `bug!` evaluates to in a release build, returned by a host function.
        let err = classify(wasmtime::Error::new(ApiError::Bug("it cannot happen")), &state, &limits).unwrap_err();
        assert!(matches!(err, ApiError::Bug("it cannot happen")), "{err}");
        assert_eq!((err.status().code(), err.kind()), (500, "internal"));
    }

    /// How many of the pages in `[at, at + len)` are resident (`mincore`).
    fn resident_pages(at: *mut u8, len: usize) -> usize {
        let page = 4096;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: a mapped, page-aligned range of the guest's memory and a vector of one byte per page.
        let done = unsafe { libc::mincore(at.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(done, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn release_memory_gives_back_a_dirtied_memory_above_its_first_mib() {
        const MIB: usize = 1024 * 1024;
        let engine = super::super::engine::compiler_engine(crate::config::GuestProfiler::Off).expect("an engine");
        // 16 MiB, every byte written 7.
        let wasm = wat::parse_str(
            r#"(module (memory (export "memory") 256)
                 (func (export "_start") (memory.fill (i32.const 0) (i32.const 7) (i32.const 16777216))))"#,
        )
        .expect("wat");
        let module = wasmtime::Module::new(&engine, wasm).expect("a module");
        let pre = super::super::new_linker(&engine).expect("a linker").instantiate_pre(&module).expect("linked");
        let limits = InvokeLimits {
            timeout: Duration::from_secs(30),
            memory_limit_mb: 64,
            max_output_bytes: 1024,
            max_stderr_bytes: 1024,
            slice: Duration::from_micros(100),
            max_table_elements: 1024,
        };
        let mut runtime =
            monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build().expect("a runtime");
        runtime.block_on(async {
            let mut done = invoke(&engine, &pre, Arc::default(), Vec::new(), Entry::Start, limits, None).await;
            assert!(done.outcome.is_ok(), "the guest failed");
            let store = &mut done.spent;
            let memory =
                store.data().instance.expect("instantiated").get_memory(&mut *store, "memory").expect("memory");
            let (base, size) = (memory.data_ptr(&*store), memory.data_size(&*store));
            assert_eq!(size, 16 * MIB);
            // SAFETY: inside the guest's memory.
            let above = unsafe { base.add(MIB) };
            assert_eq!(resident_pages(above, size - MIB), (size - MIB) / 4096, "the guest dirtied every page");
            // An invocation that never yielded ran under a slice: nothing is given back early.
            release_memory(store).await;
            assert_eq!(resident_pages(above, size - MIB), (size - MIB) / 4096, "released for a short invocation");
            // As if a tick had caught it (off a shard, a yield wakes itself at once).
            store.data().turn.clone().yield_now().await;
            release_memory(store).await;
            assert_eq!(resident_pages(above, size - MIB), 0, "pages above the first MiB still resident");
            assert!(resident_pages(base, MIB) > 0, "the first MiB is wasmtime's to reset");
            let bytes = memory.data(&*store);
            assert!(bytes[..MIB].iter().all(|b| *b == 7), "below: as the guest left it");
            assert!(bytes[MIB..].iter().all(|b| *b == 0), "above: as a reset leaves it");
        });
    }
}
