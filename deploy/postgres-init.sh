#!/bin/sh
# PostgreSQL's first start on an empty volume (the postgres image runs the files of
# /docker-entrypoint-initdb.d/ once, as the superuser POSTGRES_USER): the application's own
# role and database, so the worker never connects as the superuser.
#
#   MCARD_DATABASE_PASSWORD   the role's password (required)
#   MCARD_DATABASE_USER       the role (default mcard), owner of the database
#   MCARD_DATABASE_NAME       the database (default mcard)
#
# The role may log in and owns its database (the worker's migrations create the tables in
# it); it is no superuser and may create neither databases nor roles.
set -eu
: "${MCARD_DATABASE_PASSWORD:?set MCARD_DATABASE_PASSWORD (see .env.example)}"

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "${POSTGRES_USER:-postgres}" --dbname postgres \
    --set=app_user="${MCARD_DATABASE_USER:-mcard}" \
    --set=app_db="${MCARD_DATABASE_NAME:-mcard}" \
    --set=app_password="$MCARD_DATABASE_PASSWORD" <<'SQL'
CREATE ROLE :"app_user" LOGIN PASSWORD :'app_password' NOSUPERUSER NOCREATEDB NOCREATEROLE;
CREATE DATABASE :"app_db" OWNER :"app_user";
REVOKE ALL ON DATABASE :"app_db" FROM PUBLIC;
SQL
