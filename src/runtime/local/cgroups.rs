//! Limits of sandboxed app processes (the local runtime's process driver), through cgroups: each
//! instance gets a cgroup of its own, below rack's own cgroup, with the memory and CPU its
//! service's `scale` asks for (`memory` in MB, `cpu` in convox units, 1024 a core) and at most
//! [`PIDS_PER_INSTANCE`] processes. A memory hog is then killed by the kernel inside its own
//! cgroup (the supervisor restarts it), and a fork bomb stops at its cap, while rack and the
//! other apps go on. Containers get the same from podman (`--memory`, `--cpus`).
//!
//! cgroup v1 (these hosts: one hierarchy per controller) is used as it is mounted. A host with
//! only the unified v2 hierarchy, or rack running as a normal user, gets no limits: rack says
//! so once at startup.

use std::path::{Path, PathBuf};

/// Most processes one instance may have (its fork bomb stops here).
pub const PIDS_PER_INSTANCE: u32 = 1024;

/// The scheduler period a CPU quota is a share of, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// The controllers rack sets (or reads: `cpuacct`, the CPU time used), by their v1 mount names.
/// Where `cpu` and `cpuacct` are mounted together, both names lead to the same directory.
const CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "cpuacct"];

/// Where this rack's instance cgroups go: one directory per controller.
#[derive(Debug, Clone)]
pub struct Cgroups {
    bases: Vec<PathBuf>,
}

/// What one instance may use.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// MB of memory (swap included where the kernel accounts it).
    pub memory: Option<u32>,
    /// CPU in convox units (1024 = one core).
    pub cpu: Option<u32>,
}

/// One instance's cgroup (in every controller).
#[derive(Debug)]
pub struct Instance {
    dirs: Vec<PathBuf>,
}

impl Cgroups {
    /// The cgroups of the rack `host` (its id on this machine), below rack's own cgroup in
    /// each v1 controller; `None` (and why) when they cannot be had here.
    ///
    /// # Errors
    /// Why limits cannot be set on this host.
    pub fn detect(host: &str) -> Result<Self, String> {
        if !nix::unistd::geteuid().is_root() {
            return Err("rack is not running as root".to_owned());
        }
        let own =
            std::fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let mut bases = Vec::new();
        for controller in CONTROLLERS {
            let mount = Path::new("/sys/fs/cgroup").join(controller);
            if !mount.join("cgroup.procs").exists() {
                return Err(format!("no cgroup v1 {controller} hierarchy at {}", mount.display()));
            }
            // `N:memory:/path` (a line may name several controllers: `N:cpu,cpuacct:/path`).
            let path = own
                .lines()
                .find_map(|line| {
                    let mut fields = line.splitn(3, ':');
                    let names = fields.nth(1)?;
                    let path = fields.next()?;
                    names.split(',').any(|n| n == controller).then_some(path)
                })
                .map(|path| path.trim_start_matches('/'))
                .ok_or_else(|| format!("rack's own {controller} cgroup is not in /proc/self/cgroup"))?;
            let base = mount.join(path).join(format!("rack-{host}"));
            std::fs::create_dir_all(&base).map_err(|e| format!("making {}: {e}", base.display()))?;
            bases.push(base);
        }
        let cgroups = Self { bases };
        cgroups.prune();
        Ok(cgroups)
    }

    /// Makes the cgroup of instance `id` of `app`, with `limits`.
    ///
    /// # Errors
    /// When the kernel refuses the directory or a limit.
    pub fn instance(&self, app: &str, id: &str, limits: Limits) -> std::io::Result<Instance> {
        let mut dirs = Vec::new();
        for (controller, base) in CONTROLLERS.iter().zip(&self.bases) {
            let dir = base.join(app).join(id);
            std::fs::create_dir_all(&dir)?;
            dirs.push(dir.clone());
            match *controller {
                "memory" => {
                    if let Some(mb) = limits.memory {
                        let bytes = (u64::from(mb) << 20).to_string();
                        std::fs::write(dir.join("memory.limit_in_bytes"), &bytes)?;
                        // Swap too, where the kernel accounts it: a hog must not swap out the
                        // host instead of being stopped.
                        let memsw = dir.join("memory.memsw.limit_in_bytes");
                        if memsw.exists() {
                            std::fs::write(memsw, &bytes)?;
                        }
                    }
                }
                "cpu" => {
                    if let Some(cpu) = limits.cpu {
                        let quota = (u64::from(cpu) * CPU_PERIOD_US / 1024).max(1000);
                        std::fs::write(dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                        std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string())?;
                    }
                }
                "pids" => std::fs::write(dir.join("pids.max"), PIDS_PER_INSTANCE.to_string())?,
                // Read only (`cpu_usage_ns`).
                _ => {}
            }
        }
        Ok(Instance { dirs })
    }

    /// The cgroup of instance `id` of `app` as it is (an adopted instance's), to remove once it
    /// has ended.
    pub fn existing(&self, app: &str, id: &str) -> Instance {
        Instance {
            dirs: self.bases.iter().map(|base| base.join(app).join(id)).collect(),
        }
    }

    /// The `cgroup.procs` files of the instance `id` of `app` (a command run in it with `exec`
    /// joins them); empty when it has no cgroups. Only those that exist: an instance started
    /// by a rack before `cpuacct` was one of the controllers has no cgroup there, and a command
    /// run in it still belongs in its memory, cpu and pids cgroups.
    pub fn procs_of(&self, app: &str, id: &str) -> Vec<PathBuf> {
        self.bases
            .iter()
            .map(|base| base.join(app).join(id).join("cgroup.procs"))
            .filter(|file| file.exists())
            .collect()
    }

    /// Bytes of memory instance `id` of `app` uses now (its cgroup's `memory.usage_in_bytes`).
    pub fn memory_bytes(&self, app: &str, id: &str) -> Option<u64> {
        let file = self.bases.first()?.join(app).join(id).join("memory.usage_in_bytes");
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Nanoseconds of CPU instance `id` of `app` has used, all its processes together, the
    /// ended ones included (its cgroup's `cpuacct.usage`).
    pub fn cpu_usage_ns(&self, app: &str, id: &str) -> Option<u64> {
        let file = self.bases.get(3)?.join(app).join(id).join("cpuacct.usage");
        std::fs::read_to_string(file).ok()?.trim().parse().ok()
    }

    /// Removes the cgroups left empty (instances of an earlier run of rack, killed before it
    /// could remove them).
    fn prune(&self) {
        for base in &self.bases {
            for app in std::fs::read_dir(base).into_iter().flatten().flatten() {
                for instance in std::fs::read_dir(app.path()).into_iter().flatten().flatten() {
                    if instance.file_type().is_ok_and(|t| t.is_dir()) {
                        let _ = std::fs::remove_dir(instance.path());
                    }
                }
                let _ = std::fs::remove_dir(app.path());
            }
        }
    }
}

impl Instance {
    /// The files a process writes its pid to, to join the instance's cgroup.
    pub fn procs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|dir| dir.join("cgroup.procs")).collect()
    }

    /// The instance's directory in the `pids` controller (tests read `pids.current` there).
    pub fn pids_dir(&self) -> &Path {
        &self.dirs[2]
    }

    /// Removes the cgroup once its processes are gone (a cgroup with processes stays).
    pub fn remove(&self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir(dir);
            if let Some(app) = dir.parent() {
                let _ = std::fs::remove_dir(app);
            }
        }
    }
}

/// The cgroup v1 directory of `controller` that process `pid` is in (a container's, which
/// podman made: rack's own cgroups are by app and instance), read from `/proc/<pid>/cgroup`.
pub fn of_pid(pid: u32, controller: &str) -> Option<PathBuf> {
    if pid == 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    // `N:memory:/path`, or several controllers on one line: `N:cpu,cpuacct:/path`.
    let path = text.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        controllers.split(',').any(|c| c == controller).then(|| path.to_owned())
    })?;
    let dir = Path::new("/sys/fs/cgroup")
        .join(controller)
        .join(path.trim_start_matches('/'));
    dir.is_dir().then_some(dir)
}

/// A number a cgroup file holds (`memory.usage_in_bytes`, `cpuacct.usage`).
pub fn read_number(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_gets_its_limits_and_goes_away() {
        let cgroups = match Cgroups::detect(&format!("test{}", std::process::id())) {
            Ok(cgroups) => cgroups,
            Err(why) => {
                eprintln!("skipped: {why}");
                return;
            }
        };
        let instance = cgroups
            .instance(
                "app",
                "web-1",
                Limits {
                    memory: Some(64),
                    cpu: Some(512),
                },
            )
            .unwrap();
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file)).unwrap().trim().to_owned();
        assert_eq!(
            read(&instance.dirs[0], "memory.limit_in_bytes"),
            (64u64 << 20).to_string()
        );
        assert_eq!(read(&instance.dirs[1], "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(instance.pids_dir(), "pids.max"), PIDS_PER_INSTANCE.to_string());
        assert_eq!(instance.procs().len(), 4);
        instance.remove();
        assert!(instance.dirs.iter().all(|dir| !dir.exists()));
        for base in &cgroups.bases {
            std::fs::remove_dir(base).unwrap();
        }
    }
}
