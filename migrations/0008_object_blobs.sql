-- Each upload is stored as a blob of its own under a name rack chooses (`location`, relative to
-- the object store's root), never under the client's key: two uploads to one key can no longer
-- interleave in one file, and any valid key can be stored (long segments, `a` beside `a/b`).
-- The row switches to the new blob in one statement, so an object's size, digest and bytes
-- always change together. Objects stored before this keep their old location, `<app>/<key>`.
alter table objects add column location text;
update objects set location = app || '/' || key;
alter table objects alter column location set not null;
