-- The MLflow tracking database, beside Prefect's (created by POSTGRES_DB).
CREATE DATABASE mlflow OWNER shrinkflow;
