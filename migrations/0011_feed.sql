-- The rack-wide feed: typed events (app, build, release, deployment, process) for dashboards,
-- numbered in one sequence for the whole rack, in commit order.
--
-- Rows are written by triggers on the tables whose changes they describe, so no code path that
-- changes a build or a deployment can forget its event, and each event commits with its change.
-- The triggers are deferred constraint triggers: they run at commit, after everything else the
-- transaction does, so the one lock they take (the feed's counter row) is always the last lock
-- of a transaction and is held only while it commits. Two writers can therefore not deadlock
-- over it, and numbers are handed out in commit order: a reader that has seen id N never later
-- finds a new event below N, which is what makes resuming from an id gap-free.

create table feed_seq (
    only_row boolean not null default true,
    seq bigint not null,
    constraint feed_seq_pkey primary key (only_row),
    constraint feed_seq_one_row check (only_row)
);
insert into feed_seq (only_row, seq) values (true, 0);

create table feed (
    id bigint not null,
    at timestamptz not null default clock_timestamp(),
    app text not null,
    kind text not null,
    build_id text,
    release_id text,
    deployment_id uuid,
    process_id text,
    message text not null,
    data jsonb not null default '{}',
    constraint feed_pkey primary key (id)
);
create index feed_app_id on feed (app, id);
create index feed_at on feed (at);

-- NOTIFY channel `rack_feed`, payload: the app. Postgres folds equal notifications of one
-- transaction into one.
create function rack_feed_append(
    p_app text, p_kind text, p_build text, p_release text, p_deployment uuid, p_process text,
    p_message text, p_data jsonb
) returns bigint language plpgsql as $$
declare
    n bigint;
begin
    update feed_seq set seq = seq + 1 where only_row returning seq into n;
    insert into feed (id, app, kind, build_id, release_id, deployment_id, process_id, message, data)
    values (n, p_app, p_kind, p_build, p_release, p_deployment, p_process, p_message, coalesce(p_data, '{}'));
    perform pg_notify('rack_feed', p_app);
    return n;
end
$$;

-- What an app's status is while its latest deployment is in `state` (as `rack apps` shows it).
create function rack_app_status(state text) returns text language sql immutable as $$
    select case
        when state in ('pending', 'releasing', 'updating') then 'updating'
        when state in ('running', 'reverted', 'failure', 'superseded') then 'running'
        else 'rollback'
    end
$$;

create function rack_feed_apps() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        perform rack_feed_append(new.name, 'app.created', null, null, null, null,
            format('App %s created', new.name), jsonb_build_object('generation', new.generation));
    elsif tg_op = 'UPDATE' then
        perform rack_feed_append(new.name, 'app.updated', null, new.release_id, null, null,
            case when new.release_id is distinct from old.release_id
                 then format('App %s now runs release %s', new.name, coalesce(new.release_id, 'none'))
                 else format('App %s updated', new.name) end,
            jsonb_build_object('release', new.release_id, 'previous_release', old.release_id,
                               'locked', new.locked,
                               'parameters', (select coalesce(jsonb_agg(k order by k), '[]')
                                                from jsonb_object_keys(new.parameters) as k)));
    else
        perform rack_feed_append(old.name, 'app.deleted', null, null, null, null,
            format('App %s deleted', old.name), '{}');
    end if;
    return null;
end
$$;

create constraint trigger feed_apps_insert after insert on apps
    deferrable initially deferred for each row execute function rack_feed_apps();
-- event_seq and updated_at change with every log line: only what a user changed counts.
create constraint trigger feed_apps_update after update on apps
    deferrable initially deferred for each row
    when ((old.release_id, old.locked, old.parameters) is distinct from (new.release_id, new.locked, new.parameters))
    execute function rack_feed_apps();
create constraint trigger feed_apps_delete after delete on apps
    deferrable initially deferred for each row execute function rack_feed_apps();

create function rack_feed_builds() returns trigger language plpgsql as $$
declare
    kind text;
    message text;
begin
    if tg_op = 'INSERT' then
        kind := 'build.created';
        message := format('Build %s created', new.id);
    elsif new.status = 'running' then
        kind := 'build.started';
        message := format('Build %s started', new.id);
    elsif new.status = 'complete' then
        kind := 'build.succeeded';
        message := format('Build %s succeeded', new.id);
    elsif new.status = 'failed' and new.cancel_requested then
        kind := 'build.cancelled';
        message := format('Build %s cancelled', new.id);
    elsif new.status = 'failed' then
        kind := 'build.failed';
        message := format('Build %s failed: %s', new.id, new.reason);
    else
        -- Handed back to the queue (its replica stopped): not news.
        return null;
    end if;
    perform rack_feed_append(new.app, kind, new.id, new.release_id, null, null, message,
        jsonb_build_object('status', new.status, 'description', new.description, 'reason', new.reason,
                           'started', new.started_at, 'ended', new.ended_at,
                           'duration_seconds', extract(epoch from new.ended_at - new.started_at)));
    return null;
end
$$;

create constraint trigger feed_builds_insert after insert on builds
    deferrable initially deferred for each row execute function rack_feed_builds();
create constraint trigger feed_builds_update after update on builds
    deferrable initially deferred for each row
    when (old.status is distinct from new.status)
    execute function rack_feed_builds();

create function rack_feed_releases() returns trigger language plpgsql as $$
begin
    perform rack_feed_append(new.app, 'release.created', new.build_id, new.id, null, null,
        format('Release %s created', new.id),
        jsonb_build_object('description', new.description));
    return null;
end
$$;

create constraint trigger feed_releases_insert after insert on releases
    deferrable initially deferred for each row execute function rack_feed_releases();

create function rack_feed_deployments() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        perform rack_feed_append(new.app, 'deployment.started', null, new.release_id, new.id, null,
            format('Deployment of release %s started', new.release_id),
            jsonb_build_object('state', new.state, 'status', rack_app_status(new.state),
                               'previous_release', new.previous_release_id));
        return null;
    end if;
    perform rack_feed_append(new.app, 'deployment.state', null, new.release_id, new.id, null,
        format('Deployment of release %s: %s -> %s', new.release_id, old.state, new.state),
        jsonb_build_object('from', old.state, 'to', new.state, 'status', rack_app_status(new.state),
                           'reason', new.reason));
    return null;
end
$$;

create constraint trigger feed_deployments_insert after insert on deployments
    deferrable initially deferred for each row execute function rack_feed_deployments();
create constraint trigger feed_deployments_update after update on deployments
    deferrable initially deferred for each row
    when (old.state is distinct from new.state)
    execute function rack_feed_deployments();

-- A deployment's rollout lines (the events it owns).
-- The deployment's last line (the one with its outcome) is followed by `deployment.finished`:
-- it is the last statement of the transaction that ends a deployment, so `finished` comes
-- after everything else that transaction did (the app's new release among it).
create function rack_feed_lines() returns trigger language plpgsql as $$
declare
    d deployments;
begin
    perform rack_feed_append(new.app, 'deployment.line', null, null, new.deployment_id, null,
        new.message, jsonb_build_object('stream', new.stream, 'seq', new.seq));
    if new.outcome is null then
        return null;
    end if;
    select * into d from deployments where id = new.deployment_id;
    if not found then
        return null;
    end if;
    perform rack_feed_append(d.app, 'deployment.finished', null, d.release_id, d.id, null,
        case when d.state = 'running'
             then format('Deployment of release %s finished: running', d.release_id)
             else format('Deployment of release %s finished: %s (%s)', d.release_id, d.state, d.reason) end,
        jsonb_build_object('outcome', new.outcome, 'state', d.state, 'reason', d.reason,
                           'started', d.started_at, 'ended', d.ended_at,
                           'duration_seconds', extract(epoch from coalesce(d.ended_at, now()) - coalesce(d.started_at, d.created_at))));
    return null;
end
$$;

create constraint trigger feed_events_insert after insert on events
    deferrable initially deferred for each row
    when (new.deployment_id is not null)
    execute function rack_feed_lines();
