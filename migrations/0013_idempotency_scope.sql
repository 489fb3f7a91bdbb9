-- Idempotency keys belong to one credential and one request path (so one app's route): a
-- token can no longer claim a key that another credential, or the same one on another app,
-- is going to send, and have its own first response replayed to that request.
-- `scope` is `<credential> <METHOD> <path>`, the credential `password` or `token:<id>`.
-- Keys stored before cannot be given a scope (who sent them was not kept); they are forgotten,
-- as they would be within 24 hours anyway.
delete from idempotency_keys;
alter table idempotency_keys add column scope text not null;
alter table idempotency_keys drop constraint idempotency_keys_pkey;
alter table idempotency_keys add constraint idempotency_keys_pkey primary key (scope, key);
