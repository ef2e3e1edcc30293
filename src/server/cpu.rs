//! The CPUs this process may run on, and pinning a thread to one of them.

use std::io;

/// The CPUs in the process's allowed set (honours `taskset` and Kubernetes' static CPU policy).
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the calling thread, which at
    // start-up is the main thread and carries the process's mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&cpu| libc::CPU_ISSET(cpu, &set)).collect())
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    confine_current_thread(&[cpu])
}

/// Limits the calling thread to `cpus`; threads and processes it starts afterwards inherit the set.
pub fn confine_current_thread(cpus: &[usize]) -> io::Result<()> {
    apply_cpu_set(&cpu_set(cpus)?)
}

/// Limits the calling thread to `set` (from [`cpu_set`]). Makes one system call and allocates
/// nothing, so a child may call it between fork and exec.
pub fn apply_cpu_set(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: sched_setaffinity only reads `set`, a whole cpu_set_t.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `cpus` as the kernel's CPU set, for `sched_setaffinity` here or in a child before `exec`.
pub fn cpu_set(cpus: &[usize]) -> io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; CPU_SET is given only CPUs below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            if cpu >= libc::CPU_SETSIZE as usize {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("CPU {cpu} is out of range")));
            }
            libc::CPU_SET(cpu, &mut set);
        }
        Ok(set)
    }
}

/// Parses a CPU list as `taskset -c` and /proc write them: `0-3,8,10-11`.
///
/// ```
/// use tensor_wasm::server::cpu::{format_list, parse_list};
/// assert_eq!(parse_list("0-2,5"), Ok(vec![0, 1, 2, 5]));
/// assert_eq!(format_list(&parse_list("5,0-2").unwrap()), "0-2,5");
/// assert!(parse_list("3-1").is_err());
/// ```
pub fn parse_list(text: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in text.split(',').map(str::trim) {
        let number = |n: &str| n.trim().parse::<usize>().ok().filter(|c| *c < libc::CPU_SETSIZE as usize);
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (number(a), number(b)),
            None => (number(part), number(part)),
        };
        match (first, last) {
            (Some(a), Some(b)) if a <= b => cpus.extend(a..=b),
            _ => return Err(format!("`{text}` is not a CPU list such as 0-3,8")),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Writes sorted `cpus` as a CPU list, the inverse of [`parse_list`].
pub fn format_list(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    parts.join(",")
}
