-- The rack servers sharing this database (convox `rack ps`): each writes its row at startup,
-- refreshes `last_seen` while it runs and removes the row when it stops cleanly. A row not
-- refreshed for a job lease (RACK_JOB_LEASE) is a replica that died; readers leave it out and
-- the next replica to start or beat removes it.
create table rack_replicas (
    id uuid not null,
    host text not null,
    port integer not null,
    pid integer not null,
    version text not null,
    started_at timestamptz not null default now(),
    last_seen timestamptz not null default now(),
    constraint rack_replicas_pkey primary key (id)
);
