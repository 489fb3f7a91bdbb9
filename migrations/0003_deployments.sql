-- Deployments: promoting a release rolls it out as a job, one at a time per app.

-- The release the app runs now. It switches only when a deployment reaches Running.
alter table apps add column release_id text;
alter table apps
    add constraint apps_release_fkey foreign key (release_id) references releases (id) on delete set null
    deferrable initially deferred;

create table deployments (
    id uuid not null,
    app text not null,
    release_id text not null,
    -- The app's release when the deployment started: what a rollback restores (null: none).
    previous_release_id text,
    state text not null default 'pending',
    reason text not null default '',
    timeout_secs integer not null,
    cancel_requested boolean not null default false,
    attempts integer not null default 0,
    lease_owner uuid,
    lease_expires_at timestamptz,
    started_at timestamptz,
    ended_at timestamptz,
    created_at timestamptz not null default now(),
    updated_at timestamptz not null default now(),
    constraint deployments_pkey primary key (id),
    constraint deployments_app_fkey foreign key (app) references apps (name) on delete cascade,
    constraint deployments_release_fkey foreign key (release_id) references releases (id) on delete cascade,
    constraint deployments_previous_fkey foreign key (previous_release_id) references releases (id) on delete set null,
    constraint deployments_state check (state in (
        'pending', 'updating', 'running', 'deadline', 'error', 'cancelled', 'rollback', 'reverted', 'failure',
        'superseded'))
);

-- One deployment in progress per app, whichever replica is asked: a second promote violates this.
create unique index deployments_one_active_per_app on deployments (app)
    where state in ('pending', 'updating', 'deadline', 'error', 'cancelled', 'rollback');
create index deployments_app_created on deployments (app, created_at desc);
create index deployments_queue on deployments (created_at)
    where state in ('pending', 'updating', 'deadline', 'error', 'cancelled', 'rollback');

-- Stable router ports of the local runtime, so an app keeps its address across restarts.
create table routers (
    app text not null,
    service text not null,
    port integer not null,
    created_at timestamptz not null default now(),
    constraint routers_pkey primary key (app, service),
    constraint routers_app_fkey foreign key (app) references apps (name) on delete cascade,
    constraint routers_port_key unique (port)
);
