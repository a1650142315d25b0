#!/bin/sh
# Starts the MLflow tracking server with basic auth: `serve.sh --host H --port P [...]`.
#
# MLflow reads everything else from the environment (MLFLOW_BACKEND_STORE_URI,
# MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD, ...), except the
# auth app's user database, which it reads only from an ini file. This writes that file
# from MLFLOW_AUTH_DATABASE_URI into MLFLOW_AUTH_CONFIG_PATH, readable by this user only,
# so the database password never sits in the repository or the image.
set -eu

umask 077
cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = $MLFLOW_AUTH_DATABASE_URI
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Training logs metrics every step: verify each password hash once a minute, not per request.
auth_cache_ttl_seconds = 60
INI

exec mlflow server --app-name basic-auth --serve-artifacts "$@"
