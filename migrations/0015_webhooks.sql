-- Webhooks: signed HTTP deliveries of feed events (src/webhooks/, src/jobs/webhooks.rs).
--
-- Deliveries are driven by the persisted feed: a trigger on `feed` queues one delivery per
-- enabled hook that wants the event, in the transaction that writes the event. An event is
-- therefore queued exactly when it commits, whatever process wrote it, and a queued delivery
-- survives any crash of rack. The delivery keeps the event (`payload`), so pruning the feed
-- does not empty a queue that is still being retried.

create table webhooks (
    id uuid not null,
    url text not null,
    -- The HMAC key. Returned once, when the hook is created; needed in clear to sign.
    secret text not null,
    -- Kind prefixes of the feed (`deployment.`, `build.failed`).
    events text[] not null,
    -- Only events of these apps (null: every app).
    apps text[],
    enabled boolean not null default true,
    created_at timestamptz not null default now(),
    -- The first failed attempt since the last success (null: the last attempt succeeded).
    failing_since timestamptz,
    disabled_at timestamptz,
    disabled_reason text,
    constraint webhooks_pkey primary key (id)
);

create table webhook_deliveries (
    id uuid not null,
    hook_id uuid not null,
    event_id bigint not null,
    app text not null,
    kind text not null,
    payload jsonb not null,
    -- pending: to be attempted at `next_attempt_at`; delivered; failed (gave up).
    state text not null default 'pending',
    attempts integer not null default 0,
    created_at timestamptz not null default now(),
    -- Retries go on for a while after this (a redelivery starts it again).
    retry_since timestamptz not null default now(),
    next_attempt_at timestamptz not null default now(),
    -- The attempt in flight: who holds it, until when, since when.
    lease_owner uuid,
    lease_expires_at timestamptz,
    claimed_at timestamptz,
    ended_at timestamptz,
    reason text,
    constraint webhook_deliveries_pkey primary key (id),
    constraint webhook_deliveries_hook_fkey foreign key (hook_id) references webhooks (id) on delete cascade,
    constraint webhook_deliveries_event unique (hook_id, event_id),
    constraint webhook_deliveries_state check (state in ('pending', 'delivered', 'failed'))
);
create index webhook_deliveries_due on webhook_deliveries (next_attempt_at) where state = 'pending';
create index webhook_deliveries_hook on webhook_deliveries (hook_id, created_at desc);

create table webhook_attempts (
    id bigint generated always as identity,
    delivery_id uuid not null,
    -- 1 for the first attempt of the delivery.
    attempt integer not null,
    at timestamptz not null default now(),
    -- The receiver's HTTP status (null: no answer: refused, timed out, interrupted).
    status integer,
    error text,
    latency_ms integer not null,
    -- The beginning of the receiver's answer.
    response text not null default '',
    constraint webhook_attempts_pkey primary key (id),
    constraint webhook_attempts_delivery_fkey foreign key (delivery_id)
        references webhook_deliveries (id) on delete cascade
);
create index webhook_attempts_delivery on webhook_attempts (delivery_id, id);

-- NOTIFY-free: the feed row that queues a delivery already NOTIFYs `rack_feed`, which wakes
-- the delivery workers of every replica.
create function rack_webhooks_enqueue() returns trigger language plpgsql as $$
begin
    insert into webhook_deliveries (id, hook_id, event_id, app, kind, payload)
    select gen_random_uuid(), h.id, new.id, new.app, new.kind, to_jsonb(new)
      from webhooks h
     where h.enabled
       and (h.apps is null or new.app = any(h.apps))
       and exists (select 1 from unnest(h.events) as prefix where starts_with(new.kind, prefix));
    return null;
end
$$;

create trigger webhooks_enqueue after insert on feed
    for each row execute function rack_webhooks_enqueue();
