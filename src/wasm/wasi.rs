//! WASI preview-1 (`wasi_snapshot_preview1`), the subset a serverless function needs, written for
//! this runtime rather than taken from wasmtime-wasi:
//!
//! - stdin is the request body, stdout the response body (capped: past the cap the guest traps with
//!   `output_too_large`), stderr is kept up to a cap for the log;
//! - args, environment, clocks, randomness and `proc_exit` work;
//! - there is no filesystem and no socket: every such call answers `EBADF` (no such descriptor), or
//!   `ENOTSUP` on the stdio descriptors, which is what a sandbox without preopens means.
//!
//! Why our own: wasmtime-wasi's synchronous preview-1 linker starts a hidden multi-threaded tokio
//! runtime, and its `fd_write` writes only the first non-empty buffer per call. These functions
//! touch only guest memory and the store, so they never block the shard.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Engine, Extern, FuncType, Linker, Val, ValType};

use super::state::{GuestState, GuestStop};
use crate::error::bug;

pub const MODULE: &str = "wasi_snapshot_preview1";

const SUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ENOTSUP: i32 = 58;
const ESPIPE: i32 = 70;

const FILETYPE_CHARACTER_DEVICE: u8 = 2;
const RIGHT_FD_READ: u64 = 1 << 1;
const RIGHT_FD_WRITE: u64 = 1 << 6;
const RIGHT_POLL_FD_READWRITE: u64 = 1 << 27;

/// Bytes `random_get` fills between two looks at the clock: about 27 µs at the kernel's 300 MB/s,
/// a quarter of the default guest slice, so that a call yields at most that long after its slice's
/// half, as guest code does (`Turn::within_slice`).
const RANDOM_CHUNK_BYTES: u32 = 8 * 1024;
/// Most buffers in one `fd_read` or `fd_write`, as Linux's `IOV_MAX`: more is `EINVAL`, so that
/// one call's work is bounded by the buffers' bytes (capped by stdin and the output caps), not by
/// a count the guest chooses.
const IOV_MAX: u32 = 1024;

/// Functions that exist only to answer "no such descriptor": (name, parameter types as `i`/`I`).
/// `I` is i64. Every one returns an errno (i32).
const NO_DESCRIPTOR: &[(&str, &str)] = &[
    ("fd_advise", "iIIi"),
    ("fd_allocate", "iII"),
    ("fd_datasync", "i"),
    ("fd_fdstat_set_flags", "ii"),
    ("fd_fdstat_set_rights", "iII"),
    ("fd_filestat_set_size", "iI"),
    ("fd_filestat_set_times", "iIIi"),
    ("fd_pread", "iiiIi"),
    ("fd_pwrite", "iiiIi"),
    ("fd_readdir", "iiiIi"),
    ("fd_renumber", "ii"),
    ("fd_sync", "i"),
    ("fd_tell", "ii"),
    ("fd_prestat_get", "ii"),
    ("fd_prestat_dir_name", "iii"),
    ("path_create_directory", "iii"),
    ("path_filestat_get", "iiiii"),
    ("path_filestat_set_times", "iiiiIIi"),
    ("path_link", "iiiiiii"),
    ("path_open", "iiiiiIIii"),
    ("path_readlink", "iiiiii"),
    ("path_remove_directory", "iii"),
    ("path_rename", "iiiiii"),
    ("path_symlink", "iiiii"),
    ("path_unlink_file", "iii"),
    ("sock_accept", "iii"),
    ("sock_recv", "iiiiii"),
    ("sock_send", "iiiii"),
    ("sock_shutdown", "ii"),
    ("poll_oneoff", "iiii"),
    ("proc_raise", "i"),
];

/// Functions implemented below, with real behaviour.
const IMPLEMENTED: &[&str] = &[
    "args_get",
    "args_sizes_get",
    "environ_get",
    "environ_sizes_get",
    "clock_res_get",
    "clock_time_get",
    "fd_close",
    "fd_fdstat_get",
    "fd_filestat_get",
    "fd_read",
    "fd_seek",
    "fd_write",
    "proc_exit",
    "random_get",
    "sched_yield",
];

/// Whether `wasi_snapshot_preview1::name` is provided.
pub fn provides(name: &str) -> bool {
    IMPLEMENTED.contains(&name) || NO_DESCRIPTOR.iter().any(|(n, _)| *n == name)
}

type Ctx<'a> = Caller<'a, GuestState>;

/// Which of the guest's string lists (argv or the environment) a call reads.
type StringList = fn(&GuestState) -> &[Vec<u8>];

/// Guest memory and the store's state, borrowed together.
///
/// The export is looked up once per store, on the first host call: a lookup by name hashes the
/// name, and the json guest's WASI calls spent about 2 µs per invoke doing it every time.
pub(super) fn memory<'a>(caller: &'a mut Ctx<'_>) -> wasmtime::Result<(&'a mut [u8], &'a mut GuestState)> {
    let mem = match caller.data().memory {
        Some(mem) => mem,
        None => match caller.get_export("memory") {
            Some(Extern::Memory(mem)) => {
                caller.data_mut().memory = Some(mem);
                mem
            }
            _ => return Err(wasmtime::Error::msg("WASI call from a module that exports no `memory`")),
        },
    };
    Ok(mem.data_and_store_mut(caller))
}

pub(super) fn slice(mem: &[u8], ptr: i32, len: u32) -> Option<&[u8]> {
    let start = ptr as u32 as usize;
    mem.get(start..start.checked_add(len as usize)?)
}

pub(super) fn slice_mut(mem: &mut [u8], ptr: i32, len: u32) -> Option<&mut [u8]> {
    let start = ptr as u32 as usize;
    mem.get_mut(start..start.checked_add(len as usize)?)
}

fn read_u32(mem: &[u8], ptr: u32) -> Option<u32> {
    let b = mem.get(ptr as usize..ptr as usize + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn write_bytes(mem: &mut [u8], ptr: i32, bytes: &[u8]) -> bool {
    match slice_mut(mem, ptr, bytes.len() as u32) {
        Some(dst) => {
            dst.copy_from_slice(bytes);
            true
        }
        None => false,
    }
}

fn errno(ok: bool) -> i32 {
    if ok {
        SUCCESS
    } else {
        EFAULT
    }
}

/// The number of entries of an iovec array, if the whole array lies inside guest memory. Checked
/// up front, so that a bad array fails before anything is read or written; no allocation, as
/// this runs on every fd_read and fd_write.
fn iovec_count(mem: &[u8], iovs: i32, count: i32) -> Result<u32, i32> {
    let count = count as u32;
    if count > IOV_MAX {
        return Err(EINVAL);
    }
    slice(mem, iovs, count * 8).map(|_| count).ok_or(EFAULT)
}

/// Entry `i` (ptr, len) of an iovec array checked by [`iovec_count`].
fn iovec(mem: &[u8], iovs: i32, i: u32) -> Option<(u32, u32)> {
    let at = (iovs as u32).checked_add(i.checked_mul(8)?)?;
    Some((read_u32(mem, at)?, read_u32(mem, at.checked_add(4)?)?))
}

/// Writes a list of NUL-terminated strings as WASI's `*_get` calls lay them out.
fn write_string_list(mem: &mut [u8], list: &[Vec<u8>], ptrs: i32, buf: i32) -> i32 {
    let mut at = buf as u32;
    for (i, s) in list.iter().enumerate() {
        let Some(slot) = (ptrs as u32).checked_add(i as u32 * 4) else {
            return EFAULT;
        };
        if !write_bytes(mem, slot as i32, &at.to_le_bytes()) || !write_bytes(mem, at as i32, s) {
            return EFAULT;
        }
        at += s.len() as u32;
    }
    SUCCESS
}

fn write_sizes(mem: &mut [u8], list: &[Vec<u8>], count_ptr: i32, size_ptr: i32) -> i32 {
    let total: usize = list.iter().map(Vec::len).sum();
    errno(
        write_bytes(mem, count_ptr, &(list.len() as u32).to_le_bytes())
            && write_bytes(mem, size_ptr, &(total as u32).to_le_bytes()),
    )
}

fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// Adds every `wasi_snapshot_preview1` function to `linker`.
pub fn add_to_linker(linker: &mut Linker<GuestState>, engine: &Engine) -> wasmtime::Result<()> {
    process_start();
    // argv and the environment: the same pair of calls over two lists.
    let lists: [(&str, &str, StringList); 2] =
        [("args_get", "args_sizes_get", |st| &st.wasi.args), ("environ_get", "environ_sizes_get", |st| &st.wasi.env)];
    for (get, sizes_get, list) in lists {
        linker.func_wrap(MODULE, get, move |mut c: Ctx<'_>, ptrs: i32, buf: i32| {
            let (mem, st) = memory(&mut c)?;
            Ok(write_string_list(mem, list(st), ptrs, buf))
        })?;
        linker.func_wrap(MODULE, sizes_get, move |mut c: Ctx<'_>, count: i32, size: i32| {
            let (mem, st) = memory(&mut c)?;
            Ok(write_sizes(mem, list(st), count, size))
        })?;
    }
    linker.func_wrap(MODULE, "clock_res_get", |mut c: Ctx<'_>, id: i32, out: i32| {
        if !(0..=3).contains(&id) {
            return Ok(EINVAL);
        }
        let (mem, _) = memory(&mut c)?;
        Ok(errno(write_bytes(mem, out, &1u64.to_le_bytes())))
    })?;
    linker.func_wrap(MODULE, "clock_time_get", |mut c: Ctx<'_>, id: i32, _precision: i64, out: i32| {
        let nanos: u64 = match id {
            0 => SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0),
            // Monotonic, and the CPU-time clocks, which a sandbox approximates by monotonic time.
            1..=3 => process_start().elapsed().as_nanos() as u64,
            _ => return Ok(EINVAL),
        };
        let (mem, _) = memory(&mut c)?;
        Ok(errno(write_bytes(mem, out, &nanos.to_le_bytes())))
    })?;
    linker
        .func_wrap(MODULE, "fd_close", |_: Ctx<'_>, fd: i32| Ok(if (0..=2).contains(&fd) { SUCCESS } else { EBADF }))?;
    linker.func_wrap(MODULE, "fd_fdstat_get", |mut c: Ctx<'_>, fd: i32, out: i32| {
        let rights = match fd {
            0 => RIGHT_FD_READ | RIGHT_POLL_FD_READWRITE,
            1 | 2 => RIGHT_FD_WRITE | RIGHT_POLL_FD_READWRITE,
            _ => return Ok(EBADF),
        };
        let mut stat = [0u8; 24];
        stat[0] = FILETYPE_CHARACTER_DEVICE;
        stat[8..16].copy_from_slice(&rights.to_le_bytes());
        let (mem, _) = memory(&mut c)?;
        Ok(errno(write_bytes(mem, out, &stat)))
    })?;
    linker.func_wrap(MODULE, "fd_filestat_get", |mut c: Ctx<'_>, fd: i32, out: i32| {
        if !(0..=2).contains(&fd) {
            return Ok(EBADF);
        }
        let mut stat = [0u8; 64];
        stat[16] = FILETYPE_CHARACTER_DEVICE;
        let (mem, _) = memory(&mut c)?;
        Ok(errno(write_bytes(mem, out, &stat)))
    })?;
    linker.func_wrap(MODULE, "fd_seek", |_: Ctx<'_>, fd: i32, _off: i64, _whence: i32, _out: i32| {
        Ok(if (0..=2).contains(&fd) { ESPIPE } else { EBADF })
    })?;
    linker.func_wrap(MODULE, "fd_read", |mut c: Ctx<'_>, fd: i32, iovs: i32, count: i32, nread: i32| {
        if fd != 0 {
            return Ok(EBADF);
        }
        let (mem, st) = memory(&mut c)?;
        let entries = match iovec_count(mem, iovs, count) {
            Ok(entries) => entries,
            Err(errno) => return Ok(errno),
        };
        let mut total = 0u32;
        for i in 0..entries {
            let Some((ptr, len)) = iovec(mem, iovs, i) else { return Ok(EFAULT) };
            let rest = &st.stdin[st.stdin_pos..];
            let n = rest.len().min(len as usize);
            let Some(dst) = slice_mut(mem, ptr as i32, n as u32) else {
                return Ok(EFAULT);
            };
            dst.copy_from_slice(&rest[..n]);
            st.stdin_pos += n;
            total += n as u32;
            if n < len as usize {
                break;
            }
        }
        Ok(errno(write_bytes(mem, nread, &total.to_le_bytes())))
    })?;
    linker.func_wrap(MODULE, "fd_write", |mut c: Ctx<'_>, fd: i32, iovs: i32, count: i32, nwritten: i32| {
        if fd != 1 && fd != 2 {
            return Ok(EBADF);
        }
        let (mem, st) = memory(&mut c)?;
        let entries = match iovec_count(mem, iovs, count) {
            Ok(entries) => entries,
            Err(errno) => return Ok(errno),
        };
        let mut total = 0u32;
        // Every buffer is written, not just the first (preview-1 allows short writes; guests that
        // loop on them still work, and those that don't lose nothing).
        for i in 0..entries {
            let Some((ptr, len)) = iovec(mem, iovs, i) else { return Ok(EFAULT) };
            let Some(data) = slice(mem, ptr as i32, len) else {
                return Ok(EFAULT);
            };
            // As writev(2): buffers that add up past what the count can say are EINVAL.
            let Some(sum) = total.checked_add(len) else { return Ok(EINVAL) };
            total = sum;
            if fd == 1 {
                st.write_stdout(data)?;
            } else {
                st.write_stderr(data);
            }
        }
        Ok(errno(write_bytes(mem, nwritten, &total.to_le_bytes())))
    })?;
    linker.func_wrap(MODULE, "proc_exit", |_: Ctx<'_>, code: i32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(GuestStop::Exit(code)))
    })?;
    // Filling a buffer costs time in proportion to its length (the kernel's generator does about
    // 300 MB/s), and one call may ask for all of memory: so it fills in chunks, yields the shard
    // between them like guest code does at an epoch tick, and stops at the deadline.
    linker.func_wrap_async(MODULE, "random_get", |mut c: Ctx<'_>, (buf, len): (i32, i32)| {
        Box::new(async move {
            let total = len as u32;
            if slice_mut(memory(&mut c)?.0, buf, total).is_none() {
                return Ok(EFAULT);
            }
            let mut done = 0u32;
            while done < total {
                let n = (total - done).min(RANDOM_CHUNK_BYTES);
                let (mem, st) = memory(&mut c)?;
                // Memory never shrinks, and the whole buffer was checked above.
                let Some(dst) = slice_mut(mem, (buf as u32 + done) as i32, n) else {
                    let bug =
                        bug!("a buffer checked against memory stays in it", "random_get {buf} + {done}, {n} bytes");
                    return Err(wasmtime::Error::new(bug));
                };
                if getrandom::fill(dst).is_err() {
                    return Ok(EINVAL);
                }
                done += n;
                if Instant::now() >= st.deadline {
                    return Err(wasmtime::Error::new(wasmtime::Trap::Interrupt));
                }
                // As guest code at a tick: once half the slice has gone, counted from when the
                // invocation was last let go (its code before this call included).
                if !st.turn.within_slice(st.slice() / 2) {
                    let turn = st.turn.clone();
                    turn.yield_now().await;
                }
            }
            Ok(SUCCESS)
        })
    })?;
    linker.func_wrap(MODULE, "sched_yield", |_: Ctx<'_>| Ok(SUCCESS))?;

    for (name, params) in NO_DESCRIPTOR {
        let params = params.chars().map(|c| if c == 'I' { ValType::I64 } else { ValType::I32 });
        let ty = FuncType::new(engine, params, [ValType::I32]);
        // path_symlink's first argument is a path, not a descriptor.
        let first_is_fd = *name != "path_symlink";
        linker.func_new(MODULE, name, ty, move |_, args, results| {
            let fd = args.first().and_then(Val::i32);
            let on_stdio = first_is_fd && matches!(fd, Some(0..=2));
            results[0] = Val::I32(if on_stdio { ENOTSUP } else { EBADF });
            Ok(())
        })?;
    }
    Ok(())
}
