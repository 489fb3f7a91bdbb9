-- Idempotency keys: a retried POST with the same key and request gets the first response.
create table idempotency_keys (
    key text not null,
    request_hash text not null,
    -- 'pending' while the first request runs; 'done' once its response is stored.
    state text not null default 'pending',
    status integer,
    headers jsonb not null default '{}',
    body bytea,
    -- The deployment whose log a followed promote streamed (replayed as that stream).
    deployment_id uuid,
    created_at timestamptz not null default now(),
    constraint idempotency_keys_pkey primary key (key),
    constraint idempotency_keys_state check (state in ('pending', 'done'))
);
create index idempotency_keys_created on idempotency_keys (created_at);
