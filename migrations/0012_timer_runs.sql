-- Timers that rack runs itself (the local runtime; on Kubernetes CronJobs do): one row per
-- scheduled time that a replica claimed, so that however many replicas look, each time runs
-- once. The row also names the process, for `concurrency: Forbid` and `Replace`.
create table timer_runs (
    app text not null,
    timer text not null,
    -- The scheduled time this run is for (UTC, on a minute).
    due_at timestamptz not null,
    release_id text not null,
    -- The process started for it; null when it was skipped (`Forbid`) or could not start.
    process text,
    -- Why it did not run, when it did not.
    skipped text,
    claimed_at timestamptz not null default now(),
    constraint timer_runs_pkey primary key (app, timer, due_at),
    constraint timer_runs_app_fkey foreign key (app) references apps (name) on delete cascade
);
