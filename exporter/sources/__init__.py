"""Where jobs come from: the spool folder, Redis Streams, the jobs API, schedules."""
