//! What the machine and the server process did over a measurement, from /proc: CPU time per
//! answer, the hypervisor's steal, resident memory, and whether the machine stalled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

/// CPU time per answered request, from /proc: the fairest comparison of two designs on a machine
/// where the load generator shares the CPUs.
#[derive(Clone, Debug, Serialize)]
pub struct CpuReport {
    /// The server process (only when the harness started it).
    pub server_us_per_answer: Option<f64>,
    /// The harness itself: the load generator's cost.
    pub harness_us_per_answer: Option<f64>,
    /// The share of the machine's CPU time its hypervisor took for other guests over the plan
    /// (`steal` in /proc/stat). Above a few percent, tail latency measures the host, not the server.
    pub stolen_percent: Option<f64>,
}

/// The server's resident memory over a run: whether it stays flat under load. Anonymous memory
/// (heap, stacks, instance slots) is what can leak; the rest of the resident set is mostly the
/// audit log's mapped segment, page cache that grows to the segment size and is released when
/// the segment is sealed.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct MemoryReport {
    /// Anonymous memory at the end of the warm-up, in MiB.
    pub anon_after_warmup_mib: f64,
    /// At the end of the run.
    pub anon_end_mib: f64,
    /// The most seen in between (sampled every 250 ms).
    pub anon_peak_mib: f64,
    /// The whole resident set at its largest, file-backed pages included.
    pub rss_peak_mib: f64,
}

/// Samples `pid`'s memory every 250 ms while `running`.
pub(super) fn sample_memory(pid: u32, warmup: Duration, running: &AtomicBool) -> Option<MemoryReport> {
    let read = || -> Option<(f64, f64)> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| -> Option<f64> {
            let kib = status.lines().find_map(|l| l.strip_prefix(name))?.trim().trim_end_matches("kB").trim();
            Some(kib.parse::<f64>().ok()? / 1024.0)
        };
        Some((field("RssAnon:")?, field("VmRSS:")?))
    };
    let started = Instant::now();
    let (mut after_warmup, mut end, mut peak, mut rss_peak) = (None, None, 0.0f64, 0.0f64);
    while running.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let Some((anon, rss)) = read() else { break };
        if after_warmup.is_none() && started.elapsed() >= warmup {
            after_warmup = Some(anon);
        }
        if after_warmup.is_some() {
            peak = peak.max(anon);
            rss_peak = rss_peak.max(rss);
        }
        end = Some(anon);
    }
    Some(MemoryReport {
        anon_after_warmup_mib: after_warmup?,
        anon_end_mib: end?,
        anon_peak_mib: peak,
        rss_peak_mib: rss_peak,
    })
}

/// CPU time read when a plan starts: the server's (where the harness started it), the harness's
/// and the machine's.
pub(super) struct CpuStart {
    server: Option<f64>,
    harness: Option<f64>,
    machine: Option<(u64, u64)>,
}

impl CpuStart {
    pub(super) fn now(server_pid: Option<u32>) -> CpuStart {
        CpuStart {
            server: server_pid.and_then(cpu_seconds),
            harness: cpu_seconds(std::process::id()),
            machine: machine_ticks(),
        }
    }

    /// CPU per answer since, over the whole plan (warm-up included, as its answers are counted
    /// too), and the share the hypervisor stole.
    pub(super) fn report(&self, server_pid: Option<u32>, answered: u64) -> CpuReport {
        let answered = answered.max(1) as f64;
        let per_answer = |before: Option<f64>, after: Option<f64>| Some((after? - before?) / answered * 1e6);
        CpuReport {
            server_us_per_answer: per_answer(self.server, server_pid.and_then(cpu_seconds)),
            harness_us_per_answer: per_answer(self.harness, cpu_seconds(std::process::id())),
            stolen_percent: self.machine.zip(machine_ticks()).and_then(|((total0, stolen0), (total1, stolen1))| {
                (total1 > total0).then(|| 100.0 * (stolen1 - stolen0) as f64 / (total1 - total0) as f64)
            }),
        }
    }
}

/// The machine's CPU time so far, all CPUs and states together, and the part of it stolen, in
/// clock ticks (the `cpu` line of /proc/stat).
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).map(|t| t.parse().unwrap_or(0)).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice; guest time is already in user.
    Some((ticks.iter().take(8).sum(), *ticks.get(7)?))
}

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    tensor_wasm::cpu::cpu_time_from_stat(&stat).map(|t| t.as_secs_f64())
}

/// A generator late by more than this at P99 was stalled along with the machine.
const STALLED_GENERATOR_LAG_US: f64 = 1000.0;
/// A step in which the hypervisor took more than this share of the machine's CPU measured the
/// host. On the development VM a quiet step loses 0.0 to 0.5%; the steps that failed on host
/// stalls lost 3 to 27.5% (perf/HISTORY.md, runs G and H).
const STALLED_STEAL_PERCENT: f64 = 1.0;

/// Whether the machine, not the server, stalled during a measurement: the generator fell more
/// than a millisecond behind at P99, or the hypervisor took more than 1% of the CPU.
pub(super) fn machine_stalled(generator_lag_p99_us: f64, stolen_percent: Option<f64>) -> bool {
    generator_lag_p99_us > STALLED_GENERATOR_LAG_US || stolen_percent.is_some_and(|p| p > STALLED_STEAL_PERCENT)
}

#[cfg(test)]
mod tests {
    use super::machine_stalled;

    #[test]
    fn a_step_is_measured_again_only_when_the_machine_stalled() {
        // Quiet steps of perf/HISTORY.md's runs: 0.0 to 0.5% stolen, lag in tens of microseconds.
        assert!(!machine_stalled(68.0, Some(0.5)));
        // No /proc/stat (not Linux): only the generator's lag can tell.
        assert!(!machine_stalled(68.0, None));
        assert!(machine_stalled(1200.0, None));
        // Run G's healthz miss at 57,665/s (3.1% stolen) and run H's baseline steps (up to 27.5%).
        assert!(machine_stalled(21.0, Some(3.1)));
        assert!(machine_stalled(37.0, Some(27.5)));
    }
}
