//! The local runtime's figures for `GET /apps/{app}/metrics`: each service's router keeps, per
//! release, the last `router::SLOTS` seconds of responses (`router/tally.rs`); they are summed
//! here per period of wall-clock time, across the services asked for. The same seconds go, once
//! each, to rack's per-minute history (`drain_minutes`, written by `jobs::metrics`). Memory is each running
//! instance's cgroup (`memory.usage_in_bytes`), and CPU the cores it uses (`cpuacct.usage` between
//! two readings, `cpu.rs`): the cgroups rack makes for processes (as root), and for containers
//! the ones podman makes (found from the container's pid). Hosts without cgroup v1 report none.

use chrono::{DateTime, DurationRound, Utc};

use super::LocalRuntime;
use super::router::{Router, Sum};
use crate::runtime::{MetricsWindow, PeriodFigures, ProcessKind, Traffic, TrafficMinute};

/// A running instance as its figures are read: where its cgroups are.
#[derive(Debug, Clone)]
pub(super) struct Measured {
    pub id: String,
    pub service: String,
    pub release: String,
    /// Its main process (a container's: in the cgroups podman made for it).
    pid: u32,
    container: bool,
}

impl Measured {
    fn of(i: &super::instance::Instance) -> Self {
        Self {
            id: i.id.clone(),
            service: i.service.clone(),
            release: i.release.clone(),
            pid: i.pid.load(std::sync::atomic::Ordering::Relaxed),
            container: !i.image.is_empty(),
        }
    }
}

impl LocalRuntime {
    pub(super) fn local_traffic(&self, app: &str, service: Option<&str>, window: &MetricsWindow) -> Traffic {
        let (routers, instances): (Vec<Router>, Vec<Measured>) = self.supervisor.with_app(app, |procs| {
            let routers = procs
                .routers
                .iter()
                .filter(|(name, _)| service.is_none_or(|s| s == name.as_str()))
                .map(|(_, r)| r.clone())
                .collect();
            let instances = procs
                .instances
                .iter()
                .filter(|i| i.kind == ProcessKind::Service && service.is_none_or(|s| s == i.service))
                .filter(|i| i.exit.borrow().is_none())
                .map(|i| Measured::of(i))
                .collect();
            (routers, instances)
        });
        let memory = instances.iter().filter_map(|m| self.instance_memory(app, m)).collect();
        let cpu = instances.iter().filter_map(|m| self.instance_cpu(app, m)).collect();
        let now = Utc::now();
        Traffic {
            periods: periods(&routers, window, now),
            memory,
            cpu,
            held_since: Some(now - chrono::TimeDelta::seconds(super::router::SLOTS as i64 - 2)),
        }
    }

    /// The running instances of `app` (one-off processes too), as their figures are read.
    pub(super) fn measured(&self, app: &str) -> Vec<Measured> {
        self.supervisor.with_app(app, |procs| {
            procs
                .instances
                .iter()
                .filter(|i| i.exit.borrow().is_none())
                .map(|i| Measured::of(i))
                .collect()
        })
    }

    /// Bytes of memory instance `m` of `app` uses now, where its cgroup tells.
    fn instance_memory(&self, app: &str, m: &Measured) -> Option<u64> {
        if m.container {
            let dir = super::cgroups::of_pid(m.pid, "memory")?;
            return super::cgroups::read_number(&dir.join("memory.usage_in_bytes"));
        }
        self.cgroups.as_ref()?.memory_bytes(app, &m.id)
    }

    /// The cores instance `m` of `app` uses now, where its cgroup tells (`None` at its first
    /// reading).
    pub(super) fn instance_cpu(&self, app: &str, m: &Measured) -> Option<f64> {
        let used = if m.container {
            let dir = super::cgroups::of_pid(m.pid, "cpuacct")?;
            super::cgroups::read_number(&dir.join("cpuacct.usage"))?
        } else {
            self.cgroups.as_ref()?.cpu_usage_ns(app, &m.id)?
        };
        self.cpu.cores(&m.id, used, std::time::Instant::now())
    }

    /// What every router served since the last call, per release and minute, with the memory
    /// and CPU each release's running instances use now (where cgroups tell) in the current minute.
    pub(super) fn drain_minutes(&self, last: bool) -> Vec<TrafficMinute> {
        let now = Utc::now();
        let minute = now.duration_trunc(chrono::TimeDelta::minutes(1)).unwrap_or(now);
        let mut out = Vec::new();
        let mut running: Vec<(String, Measured)> = Vec::new();
        self.supervisor.for_each_app(|app, procs| {
            out.append(&mut procs.retired);
            for (service, router) in &procs.routers {
                out.extend(if last {
                    router.drain_last(service, now)
                } else {
                    router.drain(service, now)
                });
            }
            for i in &procs.instances {
                if i.kind == ProcessKind::Service && i.exit.borrow().is_none() {
                    running.push((app.to_owned(), Measured::of(i)));
                }
            }
        });
        let ids: Vec<&str> = running.iter().map(|(_, m)| m.id.as_str()).collect();
        self.cpu.keep_only(&ids);
        for (app, m) in &running {
            let cores = self.instance_cpu(app, m);
            let Some(bytes) = self.instance_memory(app, m) else {
                continue;
            };
            let (app, service, release) = (app.clone(), m.service.clone(), m.release.clone());
            let row = out.iter().position(|r: &TrafficMinute| {
                r.app == app && r.service == service && r.release == release && r.minute == minute
            });
            let row = row.unwrap_or_else(|| {
                out.push(TrafficMinute {
                    app: app.clone(),
                    service: service.clone(),
                    release: release.clone(),
                    minute,
                    seconds: 0,
                    requests: 0,
                    errors: 0,
                    requests_range: (0, 0),
                    errors_range: (0, 0),
                    latency: vec![0; crate::runtime::LATENCY_BUCKETS],
                    memory: None,
                    cpu: None,
                });
                out.len() - 1
            });
            let (total, count) = out[row].memory.unwrap_or((0, 0));
            out[row].memory = Some((total + bytes, count + 1));
            if let Some(cores) = cores {
                out[row].cpu = Some(out[row].cpu.unwrap_or(0.0) + cores);
            }
        }
        out
    }
}

/// The periods of `window` that `routers` still hold seconds of, `now` being their present.
fn periods(routers: &[Router], window: &MetricsWindow, now: DateTime<Utc>) -> Vec<PeriodFigures> {
    let period = window.period.max(1);
    let span = u64::try_from((window.end - window.start).num_seconds()).unwrap_or(0);
    let count = span.div_ceil(period).min(crate::runtime::MAX_METRIC_PERIODS);
    // Each router's present second; its second `s` was `now - (present - s)`.
    let presents: Vec<u64> = routers.iter().map(Router::second).collect();
    let mut out = Vec::new();
    for k in 0..count {
        let at = window.start + chrono::Duration::seconds(i64::try_from(k * period).unwrap_or(i64::MAX));
        let mut total = Sum::default();
        let mut seconds = 0;
        let mut requests_range = (u64::MAX, 0);
        let mut errors_range = (u64::MAX, 0);
        // Only the seconds the routers still hold can count: a period of 10^18 seconds must not
        // walk them all (schemathesis' `period=1045191905853492864` held a worker for minutes).
        let since_at = (now - at).num_seconds();
        let first = u64::try_from(since_at - super::router::SLOTS as i64 - 1).unwrap_or(0);
        let last = u64::try_from(since_at + 2).unwrap_or(0).min(period);
        for offset in first.min(last)..last {
            let wall = at + chrono::Duration::seconds(i64::try_from(offset).unwrap_or(i64::MAX));
            // Not yet (a negative difference would truncate to 0 and count this second twice).
            if wall > now {
                continue;
            }
            let ago = (now - wall).num_seconds();
            if ago >= super::router::SLOTS as i64 - 1 {
                continue;
            }
            let mut second = Sum::default();
            let mut held = false;
            for (router, present) in routers.iter().zip(&presents) {
                if let Some(s) = present.checked_sub(u64::try_from(ago).unwrap_or(u64::MAX)) {
                    router.add_to(&mut second, s, s);
                    router.add_to(&mut total, s, s);
                    held = true;
                }
            }
            if !held {
                continue;
            }
            seconds += 1;
            let figures = second.figures();
            requests_range = (
                requests_range.0.min(figures.requests),
                requests_range.1.max(figures.requests),
            );
            errors_range = (errors_range.0.min(figures.errors), errors_range.1.max(figures.errors));
        }
        if seconds == 0 {
            continue;
        }
        let figures = total.figures();
        out.push(PeriodFigures {
            at,
            seconds,
            requests: figures.requests,
            errors: figures.errors,
            requests_range,
            errors_range,
            p50: crate::runtime::latency_quantile(total.latency(), 500),
            p95: figures.p95,
            p99: crate::runtime::latency_quantile(total.latency(), 990),
            ..PeriodFigures::default()
        });
    }
    out
}
