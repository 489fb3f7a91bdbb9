-- rack's own log (convox `rack logs`), every replica's lines in one order, so that a follower
-- on any replica sees them all (src/jobs/rack_log.rs writes, src/api/system_logs.rs reads).
-- Lines are masked of credentials before they get here. Kept for a week, at most 100 000 lines.

-- The last seq handed out: taking numbers locks this row until commit, so replicas commit in
-- seq order and a reader that saw seq N never later finds a line below N.
create table rack_log_seq (
    id boolean not null default true,
    seq bigint not null default 0,
    constraint rack_log_seq_pkey primary key (id),
    constraint rack_log_seq_one check (id)
);
insert into rack_log_seq default values;

create table rack_log (
    seq bigint not null,
    -- The replica that wrote it (rack_replicas.id; kept after the replica is gone).
    replica uuid not null,
    at timestamptz not null,
    level text not null,
    text text not null,
    constraint rack_log_pkey primary key (seq)
);
create index rack_log_at on rack_log (at);
