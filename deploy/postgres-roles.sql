-- Least-privilege PostgreSQL roles for the mcard-tasks ledger (run with psql, as a superuser
-- or the database's owner, connected to the ledger's database).
--
--   mcard_owner     owns the schema and its tables; the only role that runs DDL:
--                   `MCARD_DATABASE_URL=<as mcard_owner> mcard-tasks db upgrade`
--   mcard_worker    workers: SELECT, INSERT, UPDATE, DELETE on the ledger's tables, USAGE on
--                   its sequences, SELECT on alembic_version (the schema check); no DDL
--   mcard_producer  producers (delay(), import, status, result reads): SELECT on operations
--                   and task_states (the conflict check and results) and alembic_version
--
-- Workers and producers run with MCARD_MIGRATE=false: they run no DDL and only check that the
-- schema is at head. Idempotent: apply it before the first `db upgrade` (the roles must exist)
-- and again after it (grants on tables that exist only then: the producer's, and the worker's
-- read-only alembic_version); again any time, harmlessly.
--
--   MCARD_DATABASE_PASSWORD_OWNER=... MCARD_DATABASE_PASSWORD_WORKER=... \
--   MCARD_DATABASE_PASSWORD_PRODUCER=... psql -v ON_ERROR_STOP=1 -d mcard -f deploy/postgres-roles.sql
--
-- The passwords come from those environment variables (psql's \getenv), never from a command
-- line, which every user of the host sees in the process list. Optional psql variables
-- (-v name=value): owner_role, worker_role, producer_role (defaults mcard_owner, mcard_worker,
-- mcard_producer), schema (default public). No password is stored in this file: a role whose
-- variable is unset or empty keeps the password it has (a new one has none: set it later with
-- `\password mcard_worker` in psql, which keeps it out of the server's log too).
-- Roles are cluster-wide; the grants below are for this database only.

\set ON_ERROR_STOP on
\if :{?owner_role}
\else
\set owner_role mcard_owner
\endif
\if :{?worker_role}
\else
\set worker_role mcard_worker
\endif
\if :{?producer_role}
\else
\set producer_role mcard_producer
\endif
\if :{?schema}
\else
\set schema public
\endif

-- The roles: logins without any cluster-wide power.
SELECT format('CREATE ROLE %I', r.role)
FROM unnest(ARRAY[:'owner_role', :'worker_role', :'producer_role']) AS r(role)
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r.role) \gexec
ALTER ROLE :"owner_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
ALTER ROLE :"worker_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
ALTER ROLE :"producer_role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS;
-- Each role's password, from the environment (unset or empty: unchanged).
\getenv owner_password MCARD_DATABASE_PASSWORD_OWNER
\if :{?owner_password}
SELECT :'owner_password' <> '' AS mcard_password_given \gset
\if :mcard_password_given
ALTER ROLE :"owner_role" PASSWORD :'owner_password';
\endif
\unset owner_password
\endif
\getenv worker_password MCARD_DATABASE_PASSWORD_WORKER
\if :{?worker_password}
SELECT :'worker_password' <> '' AS mcard_password_given \gset
\if :mcard_password_given
ALTER ROLE :"worker_role" PASSWORD :'worker_password';
\endif
\unset worker_password
\endif
\getenv producer_password MCARD_DATABASE_PASSWORD_PRODUCER
\if :{?producer_password}
SELECT :'producer_password' <> '' AS mcard_password_given \gset
\if :mcard_password_given
ALTER ROLE :"producer_role" PASSWORD :'producer_password';
\endif
\unset producer_password
\endif

-- The database: only these roles connect; only the owner may make temporary tables.
REVOKE ALL ON DATABASE :"DBNAME" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"DBNAME" TO :"owner_role";
GRANT CONNECT ON DATABASE :"DBNAME" TO :"worker_role", :"producer_role";

-- The schema: owned by mcard_owner; nobody else may create anything in it.
CREATE SCHEMA IF NOT EXISTS :"schema" AUTHORIZATION :"owner_role";
ALTER SCHEMA :"schema" OWNER TO :"owner_role";
REVOKE ALL ON SCHEMA :"schema" FROM PUBLIC;
GRANT USAGE ON SCHEMA :"schema" TO :"worker_role", :"producer_role";
ALTER ROLE :"owner_role" IN DATABASE :"DBNAME" SET search_path = :"schema";
ALTER ROLE :"worker_role" IN DATABASE :"DBNAME" SET search_path = :"schema";
ALTER ROLE :"producer_role" IN DATABASE :"DBNAME" SET search_path = :"schema";

-- Ledger tables made before this file (an embedded setup's, by another role) move to the owner.
SELECT format('ALTER TABLE %I.%I OWNER TO %I', schemaname, tablename, :'owner_role')
FROM pg_tables
WHERE schemaname = :'schema'
  AND tablename IN ('alembic_version', 'cards', 'operations', 'task_states', 'outbox',
                    'legacy_messages', 'replays')
  AND tableowner <> :'owner_role' \gexec

-- Tables and sequences the owner creates from now on (every later migration): the worker's.
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA :"schema"
    GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO :"worker_role";
ALTER DEFAULT PRIVILEGES FOR ROLE :"owner_role" IN SCHEMA :"schema"
    GRANT USAGE, SELECT ON SEQUENCES TO :"worker_role";

-- The tables that exist now. The worker: every ledger table; the producer: what it reads.
SELECT format('GRANT SELECT, INSERT, UPDATE, DELETE ON %I.%I TO %I', :'schema', name,
              :'worker_role')
FROM unnest(ARRAY['cards', 'operations', 'task_states', 'outbox', 'legacy_messages',
                   'replays']) AS name
WHERE to_regclass(format('%I.%I', :'schema', name)) IS NOT NULL \gexec
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA :"schema" TO :"worker_role";
SELECT format('GRANT SELECT ON %I.%I TO %I', :'schema', name, :'producer_role')
FROM unnest(ARRAY['operations', 'task_states', 'alembic_version']) AS name
WHERE to_regclass(format('%I.%I', :'schema', name)) IS NOT NULL \gexec
-- The schema's version: read by the worker's check, written only by the owner's upgrade.
SELECT format('REVOKE ALL ON %I.alembic_version FROM %I', :'schema', :'worker_role'),
       format('GRANT SELECT ON %I.alembic_version TO %I', :'schema', :'worker_role')
WHERE to_regclass(format('%I.alembic_version', :'schema')) IS NOT NULL \gexec
SELECT CASE WHEN to_regclass(format('%I.alembic_version', :'schema')) IS NULL
    THEN 'the ledger is not migrated yet: run `mcard-tasks db upgrade` as ' || :'owner_role'
         || ', then apply this file again (the producer''s grants need the tables)'
    ELSE 'grants applied on the migrated ledger' END AS "mcard-tasks roles";
