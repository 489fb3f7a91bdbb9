-- The rack's own settings and history (convox `rack params` and `rack releases`).

-- Settings changed with `PUT /system` (`rack params set`), by name: each overrides the value the
-- environment gave at startup, on every replica, from the next build, run or prune that reads
-- it. Only names rack knows are written (src/api/rack_system.rs); an empty value removes the row.
create table rack_params (
    name text not null,
    value text not null,
    updated_at timestamptz not null default now(),
    constraint rack_params_pkey primary key (name)
);

-- Each version of rack that has run on this database: when it first and last started.
create table rack_versions (
    version text not null,
    first_started_at timestamptz not null default now(),
    last_started_at timestamptz not null default now(),
    constraint rack_versions_pkey primary key (version)
);
