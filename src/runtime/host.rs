//! The machines that run the apps (convox `instances`): this host on the local runtime, read
//! from `/proc`; the cluster's nodes on Kubernetes.

use chrono::{DateTime, Utc};
use serde::Serialize;

/// A machine, as convox shows an instance. CPU is in cores and memory in MiB, used and
/// allocatable alike (the CLI divides one by the other).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InstanceInfo {
    pub agent: bool,
    pub cpu: f64,
    #[serde(rename = "cpu-capacity")]
    pub cpu_capacity: f64,
    #[serde(rename = "cpu-allocatable")]
    pub cpu_allocatable: f64,
    #[serde(rename = "gpu-capacity")]
    pub gpu_capacity: u32,
    #[serde(rename = "gpu-allocatable")]
    pub gpu_allocatable: u32,
    pub id: String,
    pub memory: f64,
    #[serde(rename = "memory-capacity")]
    pub memory_capacity: f64,
    #[serde(rename = "memory-allocatable")]
    pub memory_allocatable: f64,
    #[serde(rename = "private-ip")]
    pub private_ip: String,
    /// The apps' processes on it.
    pub processes: usize,
    #[serde(rename = "public-ip")]
    pub public_ip: String,
    /// `running`, or `pending` for a node that is not ready.
    pub status: String,
    pub started: DateTime<Utc>,
}

/// This host: its name, its load (the one-minute load average, in cores busy), its memory in
/// use (total less available), and when it booted.
pub fn this_host() -> InstanceInfo {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
    let load = read("/proc/loadavg")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    let meminfo = read("/proc/meminfo");
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|line| {
                line.strip_prefix(key)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0)
    };
    let total = kib("MemTotal:") / 1024.0;
    let available = kib("MemAvailable:") / 1024.0;
    let booted = read("/proc/stat")
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse::<i64>().ok())
        .and_then(|secs| DateTime::from_timestamp(secs, 0))
        .unwrap_or(DateTime::UNIX_EPOCH);
    InstanceInfo {
        agent: false,
        cpu: load,
        cpu_capacity: cores,
        cpu_allocatable: cores,
        gpu_capacity: 0,
        gpu_allocatable: 0,
        id: read("/proc/sys/kernel/hostname").trim().to_owned(),
        memory: (total - available).max(0.0),
        memory_capacity: total,
        memory_allocatable: total,
        private_ip: "127.0.0.1".to_owned(),
        processes: 0,
        public_ip: String::new(),
        status: "running".to_owned(),
        started: booted,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_host_reads_proc() {
        let host = super::this_host();
        assert!(!host.id.is_empty());
        assert!(host.cpu_allocatable >= 1.0);
        assert!(host.memory_capacity > 0.0 && host.memory <= host.memory_capacity);
        assert!(host.started < chrono::Utc::now());
    }
}
