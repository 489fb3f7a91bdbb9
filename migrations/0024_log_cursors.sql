-- Where the copy of a kept process's output into its app's log stopped (local runtime, see
-- src/runtime/local/kept.rs): written in the transaction that stores the lines copied, so a
-- rack killed at any instant neither loses nor repeats a line when the next start goes on
-- from it. `position` names the keeper (pid and start time) and its place in its output.
create table log_cursors (
    app text not null,
    process text not null,
    position text not null,
    constraint log_cursors_pkey primary key (app, process),
    constraint log_cursors_app_fkey foreign key (app) references apps (name) on delete cascade
);
