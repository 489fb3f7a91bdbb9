//! What a runtime does itself rather than leave to rack: one [`Capabilities`] value, asked of
//! it once (`Runtime::capabilities`), instead of a method per answer.

/// What a runtime takes on itself; everything `false` (the default) is rack's to do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// A build whose server died is picked up again by another (its work goes on outside
    /// rack: Kubernetes); if not, such a build fails as interrupted.
    pub resumes_builds: bool,
    /// convox.yml `timers` run in the runtime (Kubernetes: as CronJobs); if not, rack's
    /// scheduler (`jobs::timers`) starts them as one-off processes.
    pub runs_timers: bool,
    /// Apps' processes die with rack and are started again when it starts (local).
    pub restores_on_start: bool,
    /// The resources it creates load the exports a restore left (see
    /// `crate::backup::pending_import`); backups leave out the data of resources of a runtime
    /// that does not (and say so in their manifest).
    pub restores_resource_data: bool,
    /// A redis resource's data can be replaced by an RDB file ([`super::Runtime::restore_redis`]);
    /// elsewhere a redis import is refused before its upload is read.
    pub restores_redis: bool,
    /// Rack-wide resources (`POST /resources`) run here
    /// ([`super::Runtime::ensure_rack_resource`]); elsewhere creating one is 501.
    pub runs_rack_resources: bool,
    /// Builds can be exported and imported ([`super::Runtime::export_build`],
    /// [`super::Runtime::import_build`]); elsewhere both are 501.
    pub transfers_builds: bool,
}
