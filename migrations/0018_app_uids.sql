-- The uid (and gid) each app's sandboxed processes run as on the local runtime, as an offset
-- into the configured range (RACK_APP_UID_BASE): allocated on the app's first build or process
-- and kept, so its files stay its own across restarts. Not tied to `apps` by a foreign key: an
-- app deleted and made again gets its old uid back, never another app's.
create table app_uids (
    app text not null,
    uid_offset integer not null,
    constraint app_uids_pkey primary key (app),
    constraint app_uids_offset_key unique (uid_offset),
    constraint app_uids_offset_check check (uid_offset >= 0)
);
