-- Least privilege: tokens limited to some apps and to a lifetime, that record where they were
-- last used from; and the audit log of who changed what.

-- `apps`: the apps a token may act on (null: every app).
alter table tokens add column apps text[];
alter table tokens add column last_used_from text;

-- Every state-changing request, and every opening of a run, an exec or a log stream. Never a
-- secret, an env value or a body.
create table audit (
    id uuid not null,
    at timestamptz not null default now(),
    -- `password`, or `token <name>`.
    actor text not null,
    token_id uuid,
    method text not null,
    route text not null,
    path text not null,
    app text,
    -- The ids the request touched: its path's (build, release, process, service, key) and
    -- what it created (from its Location).
    ids text[] not null default '{}',
    status integer not null,
    request_id text not null default '',
    client text not null default '',
    constraint audit_pkey primary key (id)
);
create index audit_at on audit (at);
create index audit_app_at on audit (app, at);
create index audit_actor_at on audit (actor, at);
