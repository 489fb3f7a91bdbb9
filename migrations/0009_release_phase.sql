-- The release phase: a deployment whose release has a `release:` command runs it, as the state
-- `releasing`, before it changes what runs. It is a deployment in progress like the others, so
-- the one-per-app index and the queue cover it too.
alter table deployments drop constraint deployments_state;
alter table deployments add constraint deployments_state check (state in (
    'pending', 'releasing', 'updating', 'running', 'deadline', 'error', 'cancelled', 'rollback', 'reverted',
    'failure', 'superseded'));

drop index deployments_one_active_per_app;
create unique index deployments_one_active_per_app on deployments (app)
    where state in ('pending', 'releasing', 'updating', 'deadline', 'error', 'cancelled', 'rollback');
drop index deployments_queue;
create index deployments_queue on deployments (created_at)
    where state in ('pending', 'releasing', 'updating', 'deadline', 'error', 'cancelled', 'rollback');
