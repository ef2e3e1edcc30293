//! The CPUs this process may run on, pinning a thread to one of them, and the CPU time a process
//! or thread has used (for the benchmarks and tests that measure shards).

use std::io;
use std::time::Duration;

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

/// User plus system CPU time from the text of a `/proc/PID/stat` or `/proc/PID/task/TID/stat`
/// file; `None` when it does not parse.
pub fn cpu_time_from_stat(stat: &str) -> Option<Duration> {
    // The command name may hold spaces; the fields after its closing parenthesis (field 3 on of
    // proc(5)) do not. utime and stime are fields 14 and 15, in clock ticks.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(14 - 3);
    let ticks = fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|&hz| hz > 0)?;
    Some(Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / per_second))
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
/// use tensor_wasm::cpu::{format_list, parse_list};
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

/// Whether each shard is pinned to a CPU of its own or floats over the process's allowed set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinShards {
    /// Pin when the allowed set has exactly one CPU per shard, float otherwise.
    Auto,
    Always,
    Never,
}

/// Where the shards and the device workers run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The CPU each shard pins itself to, in shard order; `None`: the shards float.
    pub shards: Option<Vec<usize>>,
    /// The CPU each device worker is pinned to, in device order; `None`: the workers float.
    pub workers: Option<Vec<usize>>,
}

/// Where `shards` shards and `workers` device workers run on the `allowed` CPUs.
///
/// Pinning pays where each shard owns its CPU: an allowed set of one CPU per shard is what
/// Kubernetes' static CPU policy, `taskset` or a whole machine give. A larger set is shared with
/// others (a Burstable pod sees the node's whole shared pool), and there pinning would put every
/// replica on the node onto the same first CPUs. The one larger set that is not shared is one CPU
/// per shard and per device worker, where the cgroups' CPU limit (`cpu_limit`) lets the process
/// use all of them: an operator who asked for them, so that a worker never waits for a shard to
/// yield its CPU (perf/DISPATCH.md: a chain of streamed host ops ran at a steady 0.9 µs an op with
/// the worker pinned apart, and now and then at 4 to 5 µs when they floated). Then each worker is
/// pinned to one of the CPUs after the shards'. A limit below the set means CPUs shared with
/// others, as a container limited to half a CPU sees; and wherever there are fewer CPUs than
/// threads, workers float.
///
/// ```
/// use tensor_wasm::cpu::{placement, Placement, PinShards};
/// let pinned = |s: &[usize], w: Option<&[usize]>| Placement { shards: Some(s.to_vec()), workers: w.map(<[usize]>::to_vec) };
/// let floating = Placement { shards: None, workers: None };
/// assert_eq!(placement(PinShards::Auto, 2, 1, &[4, 5], None), pinned(&[4, 5], None));
/// assert_eq!(placement(PinShards::Auto, 1, 1, &[4, 5], None), pinned(&[4], Some(&[5])));
/// assert_eq!(placement(PinShards::Auto, 1, 1, &[4, 5], Some(2)), pinned(&[4], Some(&[5])));
/// assert_eq!(placement(PinShards::Auto, 1, 1, &[4, 5], Some(1)), floating);
/// assert_eq!(placement(PinShards::Auto, 2, 1, &[0, 1, 2, 3], None), floating);
/// assert_eq!(placement(PinShards::Always, 3, 1, &[0, 1], None), pinned(&[0, 1, 0], None));
/// assert_eq!(placement(PinShards::Always, 1, 2, &[0, 1, 2, 3], None), pinned(&[0], Some(&[1, 2])));
/// assert_eq!(placement(PinShards::Never, 1, 1, &[4, 5], None), floating);
/// ```
pub fn placement(
    mode: PinShards,
    shards: usize,
    workers: usize,
    allowed: &[usize],
    cpu_limit: Option<usize>,
) -> Placement {
    let cpus = allowed.len();
    let all_usable = cpu_limit.is_none_or(|limit| limit >= cpus);
    let pin = match mode {
        PinShards::Always => true,
        PinShards::Never => false,
        PinShards::Auto => shards == cpus || (shards + workers == cpus && all_usable),
    };
    if !pin || allowed.is_empty() {
        return Placement { shards: None, workers: None };
    }
    let shard_cpus = (0..shards).map(|i| allowed[i % cpus]).collect();
    let own = workers > 0 && shards + workers <= cpus;
    Placement { shards: Some(shard_cpus), workers: own.then(|| allowed[shards..shards + workers].to_vec()) }
}

/// The default shard count: one per allowed CPU, but no more than the CPU time the cgroups give
/// (a container's CPU limit), so that a pod limited to 2 CPUs on a 64-CPU node runs 2 shards.
pub fn default_shard_count(allowed: usize, cgroup_limit: Option<usize>) -> usize {
    allowed.min(cgroup_limit.unwrap_or(usize::MAX)).max(1)
}

/// The CPU time the process's cgroups allow, in whole CPUs rounded up (`cpu.max` of cgroup v2,
/// `cpu.cfs_quota_us` over `cpu.cfs_period_us` of v1, the tightest of the process's cgroup and
/// its ancestors); `None` where no quota is set or none can be read.
pub fn cgroup_cpu_limit() -> Option<usize> {
    let membership = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    cgroup_cpu_limit_in(std::path::Path::new("/sys/fs/cgroup"), &membership)
}

/// [`cgroup_cpu_limit`] for the cgroup file system mounted at `root` and the process's
/// `/proc/self/cgroup` text `membership` (lines of `id:controllers:path`).
pub fn cgroup_cpu_limit_in(root: &std::path::Path, membership: &str) -> Option<usize> {
    let mut tightest: Option<f64> = None;
    for line in membership.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        let limit = if controllers.is_empty() {
            walk_up(root, relative, |dir| {
                let text = std::fs::read_to_string(dir.join("cpu.max")).ok()?;
                let (quota, period) = text.trim().split_once(' ')?;
                Some((quota.parse().ok()?, period.parse().ok()?))
            })
        } else if controllers.split(',').any(|c| c == "cpu") {
            // v1 mounts the controller under its own name, alone or with cpuacct.
            [controllers, "cpu"].iter().find_map(|mount| {
                walk_up(&root.join(mount), relative, |dir| {
                    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok()?.trim().parse::<i64>().ok();
                    let quota = read("cpu.cfs_quota_us").filter(|q| *q > 0)?;
                    Some((quota as f64, read("cpu.cfs_period_us")? as f64))
                })
            })
        } else {
            None
        };
        if let Some(limit) = limit {
            tightest = Some(tightest.map_or(limit, |t| t.min(limit)));
        }
    }
    tightest.map(|cpus| (cpus.ceil() as usize).max(1))
}

/// The tightest `quota / period` that `read` finds in the cgroup `relative` under `root` and in
/// its ancestors up to `root`. A container that sees only its own cgroup at `root` while
/// /proc/self/cgroup names the host's path is read at `root` alone.
fn walk_up(
    root: &std::path::Path,
    relative: &str,
    read: impl Fn(&std::path::Path) -> Option<(f64, f64)>,
) -> Option<f64> {
    let start = root.join(relative);
    let mut dir = if start.is_dir() { start } else { root.to_path_buf() };
    let mut tightest: Option<f64> = None;
    loop {
        if let Some((quota, period)) = read(&dir).filter(|(q, p)| *q > 0.0 && *p > 0.0) {
            tightest = Some(tightest.map_or(quota / period, |t| t.min(quota / period)));
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            return tightest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn write(root: &Path, relative: &str, file: &str, text: &str) {
        let dir = root.join(relative);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(file), text).unwrap();
    }

    #[test]
    fn cpu_time_is_user_plus_system_from_a_stat_line_whose_name_has_spaces() {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let stat = format!("42 (tw shard) 0) R 1 42 42 0 -1 4194560 10 0 0 0 {} {} 0 0 20 0 3", 3 * hz, hz / 2);
        assert_eq!(cpu_time_from_stat(&stat), Some(Duration::from_millis(3_500)));
        assert_eq!(cpu_time_from_stat("42 (short) R 1"), None);
        // And the kernel's own file parses.
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_time_from_stat(&own).is_some());
    }

    #[test]
    fn a_v2_limit_is_the_tightest_on_the_way_up_rounded_up() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        write(root, "kubepods.slice", "cpu.max", "400000 100000\n");
        write(root, "kubepods.slice/pod1", "cpu.max", "max 100000\n");
        write(root, "kubepods.slice/pod1/c1", "cpu.max", "150000 100000\n");
        assert_eq!(cgroup_cpu_limit_in(root, "0::/kubepods.slice/pod1/c1\n"), Some(2));
        write(root, "kubepods.slice", "cpu.max", "50000 100000\n");
        assert_eq!(cgroup_cpu_limit_in(root, "0::/kubepods.slice/pod1/c1\n"), Some(1), "a parent's half CPU");
        write(root, "free", "cpu.max", "max 100000\n");
        assert_eq!(cgroup_cpu_limit_in(root, "0::/free\n"), None);
        assert_eq!(cgroup_cpu_limit_in(root, "0::/\n"), None, "the root has no cpu.max");
        // A container that sees only its own cgroup, while the path is the host's.
        write(root, "", "cpu.max", "300000 100000\n");
        assert_eq!(cgroup_cpu_limit_in(root, "0::/docker/abc\n"), Some(3));
    }

    #[test]
    fn a_v1_limit_comes_from_the_cpu_controller() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        write(root, "cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "250000\n");
        write(root, "cpu,cpuacct/docker/abc", "cpu.cfs_period_us", "100000\n");
        let membership = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n";
        assert_eq!(cgroup_cpu_limit_in(root, membership), Some(3));
        write(root, "cpu,cpuacct/docker/abc", "cpu.cfs_quota_us", "-1\n");
        assert_eq!(cgroup_cpu_limit_in(root, membership), None, "-1: no quota");
        assert_eq!(cgroup_cpu_limit_in(root, "garbage\n\n1:x\n"), None);
    }

    #[test]
    fn the_default_shard_count_follows_the_cpus_and_the_limit() {
        assert_eq!(default_shard_count(64, Some(2)), 2);
        assert_eq!(default_shard_count(4, Some(8)), 4);
        assert_eq!(default_shard_count(4, None), 4);
        assert_eq!(default_shard_count(0, None), 1);
    }
}
