-- The CPU the release's instances used together (cores: 1.0 is one core busy), at the largest
-- sample of the minute, where the runtime tells (the local runtime's cgroups).
alter table metric_minutes add column cpu double precision;
