#!/bin/sh
# Creates one role and database for Prefect and one role with two databases for MLflow
# (its tracking store and its basic-auth user store), each owned by its role, so neither
# server can read the other's data. The postgres image runs this once, on an empty data
# volume; tests/integration/test_infra_postgres.py runs it against a local PostgreSQL the same way.
# Passwords come from the environment and reach SQL as psql variables (quoted by psql).
set -eu

psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "$POSTGRES_USER" --dbname "${POSTGRES_DB:-$POSTGRES_USER}" \
    -v prefect_password="$PREFECT_DB_PASSWORD" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
SQL
