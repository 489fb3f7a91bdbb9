-- The apps' traffic history (`GET /apps/{app}/metrics` beyond what a router holds in memory):
-- per minute, per service and release, what the routers of every replica served. Each router
-- adds only the seconds it has not added before, so the rows of two replicas' routers sum
-- without counting a request twice. `latency` is the router's histogram (src/runtime/metrics.rs
-- names its buckets), summed bucket by bucket, so percentiles over any span stay exact to a
-- bucket. Rows older than RACK_METRICS_RETENTION_DAYS are pruned.
create table metric_minutes (
    app text not null,
    service text not null,
    release text not null,
    minute timestamptz not null,
    -- Seconds of the minute some router measured (at most 60).
    seconds integer not null,
    requests bigint not null,
    errors bigint not null,
    -- Fewest and most requests (and failures) one router served in one second of the minute.
    requests_min bigint not null,
    requests_max bigint not null,
    errors_min bigint not null,
    errors_max bigint not null,
    latency bigint[] not null,
    -- Bytes of memory the release's instances used together, at the largest sample of the
    -- minute, and how many instances that sample was over (null: not known here).
    memory_bytes bigint,
    instances integer,
    constraint metric_minutes_pkey primary key (app, service, release, minute),
    constraint metric_minutes_app_fkey foreign key (app) references apps (name) on delete cascade
);
create index metric_minutes_minute_idx on metric_minutes (minute);
