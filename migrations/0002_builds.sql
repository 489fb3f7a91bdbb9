-- Objects, builds, releases and the event log.

-- Metadata of uploaded objects; the bytes live in the object store under <app>/<key>.
create table objects (
    app text not null,
    key text not null,
    size bigint not null,
    sha256 text not null,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint objects_pkey primary key (app, key),
    constraint objects_app_fkey foreign key (app) references apps (name) on delete cascade
);

-- Releases: immutable build + env + manifest. `position` orders them (newest = highest).
create table releases (
    id text not null,
    app text not null,
    position bigint generated always as identity,
    build_id text,
    env text not null default '',
    manifest text not null default '',
    description text not null default '',
    created_at timestamptz not null default now(),
    constraint releases_pkey primary key (id),
    constraint releases_app_fkey foreign key (app) references apps (name) on delete cascade,
    constraint releases_id_format check (id ~ '^R[A-Z]{10}$')
);
create index releases_app_position on releases (app, position desc);

-- Builds: a queued job. Workers claim `created` rows (and `running` rows whose lease expired)
-- with FOR UPDATE SKIP LOCKED and renew their lease while they run.
create table builds (
    id text not null,
    app text not null,
    position bigint generated always as identity,
    status text not null default 'created',
    description text not null default '',
    git_sha text not null default '',
    source_url text not null,
    manifest_path text not null default 'convox.yml',
    manifest text not null default '',
    no_cache boolean not null default false,
    entrypoint text not null default '',
    process text not null default '',
    release_id text,
    reason text not null default '',
    logs text not null default '',
    cancel_requested boolean not null default false,
    attempts integer not null default 0,
    lease_owner uuid,
    lease_expires_at timestamptz,
    started_at timestamptz,
    ended_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint builds_pkey primary key (id),
    constraint builds_app_fkey foreign key (app) references apps (name) on delete cascade,
    constraint builds_release_fkey foreign key (release_id) references releases (id) on delete set null,
    constraint builds_id_format check (id ~ '^B[A-Z]{10}$'),
    constraint builds_status check (status in ('created', 'running', 'complete', 'failed'))
);
create index builds_app_position on builds (app, position desc);
create index builds_queue on builds (position) where status in ('created', 'running');

alter table releases
    add constraint releases_build_fkey foreign key (build_id) references builds (id) on delete cascade;

-- The event log: build output, rollout progress, process output. `seq` counts per app, taken
-- from apps.event_seq in the inserting transaction, so the app's row lock orders writers and
-- an event with a higher seq never becomes visible before one with a lower seq.
alter table apps add column event_seq bigint not null default 0;

create table events (
    app text not null,
    seq bigint not null,
    build_id text,
    deployment_id uuid,
    at timestamptz not null default clock_timestamp(),
    stream text not null,
    message text not null,
    -- Set on the last event of a build or deployment: 'ok' or 'error' (message = the reason).
    outcome text,
    constraint events_pkey primary key (app, seq),
    constraint events_app_fkey foreign key (app) references apps (name) on delete cascade,
    constraint events_outcome check (outcome in ('ok', 'error'))
);
create index events_build on events (build_id, seq) where build_id is not null;
create index events_deployment on events (deployment_id, seq) where deployment_id is not null;
