-- The service's database and role, run once on the primary as a superuser (Patroni's bootstrap
-- replicates them to every node). `psql -v password=... -f roles.sql`.
--
-- The timeouts are the role's settings because PgBouncer in transaction mode does not pass
-- the ones the service sends when it connects (UMBRA_DB_*_TIMEOUT_MS): keep the two equal.
-- Every new server connection of the role starts with them, on whichever node is primary.
CREATE ROLE umbra LOGIN PASSWORD :'password';
ALTER ROLE umbra SET statement_timeout = '5s';
ALTER ROLE umbra SET lock_timeout = '2s';
ALTER ROLE umbra SET idle_in_transaction_session_timeout = '10s';
CREATE DATABASE umbra OWNER umbra;
